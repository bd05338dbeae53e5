"""The benchmark end to end on a tiny shape, its fallback guard, its README rewrite, and its corpus."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

import bt_plugin
from bt_plugin.tools import bench, cli, corpus
from bt_plugin.tools.bench import cases as bench_cases, models as bench_models, report as bench_report
from bt_plugin.tools.bench import results as bench_results, settings as bench_settings, timing as bench_timing

pytestmark = pytest.mark.usefixtures("hf_offline")

TINY = ["--shapes", "tiny", "--repeats", "1", "--text-batches", "1", "--threads", "1", "--no-progress", "--peers", "none"]
ENGLISH = {"the", "a", "an", "of", "to", "is", "and", "in", "for", "if", "be", "this", "that", "with"}


def test_corpus_is_deterministic_english_prose():
    first = corpus.paragraphs()
    corpus.paragraphs.cache_clear()
    assert corpus.paragraphs() == first
    assert len(first) >= 96 and len(set(first)) == len(first)
    for paragraph in first:
        assert corpus.is_prose(paragraph) and ">>>" not in paragraph and "\n" not in paragraph
        assert len(paragraph.split()) >= corpus.MIN_WORDS
    words = [w.strip(".,;:!?()").lower() for p in first for w in p.split()]
    assert sum(w in ENGLISH for w in words) > 0.1 * len(words)  # function words: running English
    assert corpus.sample(96, seed=3) == corpus.sample(96, seed=3) != corpus.sample(96, seed=4)


def test_corpus_does_not_depend_on_what_this_process_imported(monkeypatch):
    """A package that replaces a standard-library function (Ray replaces `inspect.isgenerator` on
    import) changes that function's docstring here; the corpus is the same."""
    import inspect

    first = corpus.paragraphs()
    assert "Return true if the object is a generator." in first

    def replacement(obj):
        """Tell whether the object is a generator, as another package would word it."""
        return False

    monkeypatch.setattr(inspect, "isgenerator", replacement)
    here = corpus.read_paragraphs(corpus.STDLIB_MODULES)  # read in this process, the replacement shows
    assert replacement.__doc__ in here and "Return true if the object is a generator." not in here
    corpus.paragraphs.cache_clear()
    assert corpus.paragraphs() == first


def test_prose_filter_rejects_code():
    assert corpus.is_prose("Return the number of items in the container, or zero when it is empty.")
    assert not corpus.is_prose(">>> sorted([3, 1, 2])\n[1, 2, 3]")
    assert not corpus.is_prose("Example::\n\n    x = compute(1, 2)")
    assert not corpus.is_prose("sorted(iterable, /, *, key=None, reverse=False)")
    assert not corpus.is_prose("Too short to count.")


@pytest.mark.parametrize("fraction", bench_settings.SWEEP_FRACTIONS)
def test_sweep_lengths_match_the_fraction(fraction):
    lengths = bench_cases.sweep_lengths(fraction, 32, 256, seed=0)
    assert len(lengths) == 32 and lengths[0] == 256 and all(1 <= n <= 256 for n in lengths)
    assert abs(sum(lengths) / (32 * 256) - fraction) <= 1 / (32 * 256)
    assert lengths == bench_cases.sweep_lengths(fraction, 32, 256, seed=0)


def test_quick_plan_covers_every_workload_and_candidate():
    settings = bench_settings.make_settings(None, None, None, None, True, None, None, 0)
    assert {w for _, w in settings.plan()} == set(bench_settings.WORKLOADS)
    assert settings.repeats == 3 and settings.sweep_length == 128 and not settings.memory
    assert settings.threads == 1
    assert settings.candidates == tuple(bench_settings.CANDIDATES)
    assert "bert-base" not in settings.shapes


def test_busy_machine_is_measured_and_reported(monkeypatch):
    monkeypatch.setattr(bench_timing.os, "cpu_count", lambda: 2)
    # 10 s of wall time on 2 CPUs; the machine was busy 14 CPU-seconds, 8 of them ours.
    assert bench_timing.others_cpu_share((100.0, 50.0, 0.0), (114.0, 58.0, 10.0)) == pytest.approx(0.3)
    assert bench_timing.others_cpu_share((100.0, 50.0, 0.0), (108.0, 58.0, 10.0)) == 0.0
    assert bench_timing.others_cpu_share((100.0, 50.0, 0.0), (150.0, 50.0, 10.0)) == 1.0
    assert bench_timing.others_cpu_share((100.0, 50.0, 0.0), (101.0, 50.0, 0.5)) is None  # too short to tell
    assert bench_timing.others_cpu_share(None, (1.0, 1.0, 1.0)) is None
    row = bench_results.CandidateResult("stock", [100.0, 101.0, 180.0], max_abs_diff=0.0)
    case = bench_results.CaseResult("tiny", "batch1", "1 x 1 x 16", 1.0, [row], others_cpu=0.3)
    results = bench_results.BenchResults(bench_settings.Settings(), {}, [case])
    assert row.noisy and case.busy and "Busy machine" in bench_report.noise_line(results)
    assert "busy: other processes used up to 30% of the CPUs" in bench_report.render_cases(results)[0]


def test_bench_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_timing, "MIN_RUN_MS", 1.0)  # one pass per timed run: a smoke test, not a measurement
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{bench_report.README_START}\nold table\n{bench_report.README_END}\n\nafter\n")
    out_json, chart = tmp_path / "results.json", tmp_path / "speedup.png"
    drawn = []
    series = bench_report.speedup_series
    monkeypatch.setattr(bench_report, "speedup_series", lambda *a, **k: drawn.append(series(*a, **k)) or drawn[-1])
    assert cli.main(["bench", *TINY, "--no-memory", "--json", str(out_json), "--readme", str(readme),
                     "--plot", str(chart)]) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())

    # the chart: one line per shape through every case bt_plugin's CPU kernel ran, as the tables give them
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    packed_rows = [(case["real_fraction"], row["ratio_to_stock"]) for case in data["cases"] for row in case["rows"]
                   if row["candidate"] == bench_report.PLOTTED_CANDIDATE and row["median_ms"]]
    assert len(drawn) == 1 and list(drawn[0]) == ["tiny"]
    assert len(drawn[0]["tiny"]) == len(packed_rows) == len(data["cases"])
    for (fraction, ratio), (want_fraction, want_ratio) in zip(drawn[0]["tiny"], sorted(packed_rows)):
        assert fraction == pytest.approx(want_fraction) and ratio == pytest.approx(want_ratio)

    assert data["problems"] == []
    sizes = len(bench_settings.SMALL_BATCH_SIZES)
    assert [c["workload"] for c in data["cases"]] == (["text", "no-padding", "batch1", "query", "document"]
                                                      + ["small-batch"] * sizes + ["sweep"] * 5)
    assert [round(c["real_fraction"], 2) for c in data["cases"][1:5]] == [1.0, 1.0, 1.0, 1.0]
    assert [round(c["real_fraction"], 2) for c in data["cases"][-5:]] == list(bench_settings.SWEEP_FRACTIONS)
    for case in data["cases"]:
        rows = {row["candidate"]: row for row in case["rows"]}
        assert set(rows) == set(bench_settings.CANDIDATES)
        assert rows["fastpath"]["unavailable"] is None  # packed may not exist yet: reported, not run
        for name, row in rows.items():
            if row["unavailable"]:
                assert name in printed and row["unavailable"] in printed
                continue
            assert len(row["times_ms"]) == 1 and row["median_ms"] > 0 and row["ratio_to_stock"] > 0
            assert row["exact"] and row["max_abs_diff"] <= bench_results.TOLERANCE
            if bench_settings.CANDIDATES[name][1]:
                assert row["fused_calls"] > 0 and row["fallback_calls"] == 0, row
    assert all(case["others_cpu"] is None or 0 <= case["others_cpu"] <= 1 for case in data["cases"])
    text = next(c for c in data["cases"] if c["workload"] == "text")
    assert 0.05 < text["real_fraction"] < 0.9

    rewritten = readme.read_text()
    assert rewritten.startswith("# Title\n\nbefore\n\n" + bench_report.README_START + "\n")
    assert rewritten.endswith(bench_report.README_END + "\n\nafter\n") and "old table" not in rewritten
    block = rewritten.split(bench_report.README_START)[1].split(bench_report.README_END)[0]
    assert "**tiny · sweep**" in block and "**tiny · document**" in block and "| fastpath |" in block
    assert "Measured on" in block
    assert "torch " + torch.__version__ in block
    assert block.strip() in printed

    # the JSON holds what was measured: read back, it gives the same data and the same report
    again = bench_results.BenchResults.from_dict(data)
    assert json.loads(json.dumps(again.to_dict())) == data
    assert bench_report.render_markdown(again).strip() == block.strip()


def test_rerank_workload_scores_pairs_through_cross_encoder_predict(monkeypatch):
    """CrossEncoder.predict in arrival order: exact scores, fused calls counted, and the real-token
    share taken from what the model received (the same token count the tokenizer gives each pair)."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(bench_timing, "MIN_RUN_MS", 1.0)
    results = bench.run(["minilm-reranker"], candidates=["packed"], repeats=1, text_batches=1, threads=1,
                        memory=False, progress=False)
    assert results.problems() == []
    (case,) = results.cases
    assert case.workload == "rerank"
    rows = {row.candidate: row for row in case.rows}
    assert set(rows) == {"stock", "packed"} and rows["packed"].exact
    # all-MiniLM-L6-v2: 6 layers, RERANK_PASSAGES / RERANK_BATCH batches per run
    assert rows["packed"].fused_calls == 6 * bench_settings.RERANK_PASSAGES // bench_settings.RERANK_BATCH and rows["packed"].fallback_calls == 0
    assert case.matmul_gflops > 0 and 0 < case.of_limit(rows["packed"]) < 2

    (built,) = bench_cases.rerank_cases("minilm-reranker", 1, seed=0)
    pairs = built.batches[0]["pairs"]
    assert len(pairs) == bench_settings.RERANK_PASSAGES
    tokenizer = AutoTokenizer.from_pretrained(str(bench_models.minilm_dir()))
    real = sum(len(tokenizer(query, passage, truncation=True)["input_ids"]) for query, passage in pairs)
    widths = case.batch_shape.split(" x ")[2].split("/")
    padded = bench_settings.RERANK_BATCH * sum(int(width) for width in widths)
    assert case.batch_shape.startswith(f"{bench_settings.RERANK_PASSAGES // bench_settings.RERANK_BATCH} x {bench_settings.RERANK_BATCH} x ")
    assert case.real_fraction == pytest.approx(real / padded)
    assert case.real_fraction < 0.9


def test_real_flops_count_every_linear_and_attention_from_the_model():
    """BERT's layer: query, key, value, output (h x h), intermediate (h x i), output (i x h)."""
    import transformers

    from bt_plugin.tools.bench import limit

    h, i, layers = 64, 256, 3
    model = transformers.BertModel(transformers.BertConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                                                           num_attention_heads=4, vocab_size=100))
    paths = [layer.path for layer in bt_plugin.explain(model).layers]
    linears = limit.encoder_linears(model, paths)
    assert sum(linears.values()) == 6 * layers
    lengths = [5, 17]
    expected = layers * (22 * 2 * (4 * h * h + 2 * h * i) + 4 * (5 * 5 + 17 * 17) * h)
    assert limit.real_flops(linears, lengths, limit.attention_width(model.config), layers) == expected
    assert limit.matmul_rate(limit.encoder_linears(model, paths[:1]), [22], repeats=1) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rate_times_every_linear_route_and_keeps_the_fastest(monkeypatch, dtype):
    """F.linear on plain weights and oneDNN on weights packed once compute the same linear; the
    limit is the faster route's rate, whichever it is."""
    from collections import Counter

    from bt_plugin.tools.bench import limit

    linears = Counter({(64, 64): 4, (64, 256): 1, (256, 64): 1})
    weights = {(i, o): (torch.randn(o, i, dtype=dtype), torch.randn(o, dtype=dtype)) for i, o in linears}
    routes = limit.linear_routes(weights)
    assert list(routes) == ["F.linear", "oneDNN packed"]  # torch's CPU wheels have oneDNN
    for (i, o), (weight, bias) in weights.items():
        x = torch.randn(7, i, dtype=dtype)
        for route in routes.values():
            torch.testing.assert_close(route(x, (i, o)), torch.nn.functional.linear(x, weight, bias))
    flops = 2 * 7 * (4 * 64 * 64 + 2 * 64 * 256)
    for seconds in ([2.0, 0.5], [0.25, 1.0]):
        timed = []
        monkeypatch.setattr(limit, "route_seconds", lambda route, *args: timed.append(route) or seconds[len(timed) - 1])
        assert limit.matmul_rate(linears, [7], dtype=dtype) == pytest.approx(flops / min(seconds))
        assert len(timed) == 2


def test_rerank_runs_on_reranker_shapes_only():
    settings = bench_settings.make_settings(None, None, None, None, False, None, None, 0)
    assert ("minilm-reranker", "rerank") in settings.plan()
    assert all((workload == "rerank") == (shape == "minilm-reranker") for shape, workload in settings.plan())
    with pytest.raises(ValueError, match="no chosen shape runs the rerank workload; shapes that do: minilm-reranker"):
        bench_settings.make_settings(["bert-base"], ["rerank"], None, None, False, None, None, 0)


def test_peak_memory_of_one_forward_in_fresh_processes():
    results = bench.run(["tiny"], ["text"], candidates=["fastpath"], repeats=1, text_batches=1, threads=1,
                        progress=False, peers=())
    memory = {m.candidate: m for m in results.memory}
    assert set(memory) == {"stock", "fastpath"}
    for m in memory.values():
        assert m.error is None and m.peak_increase_mib >= 0, m
        # the child's baseline peak is its own current size, not this (larger) process's peak
        assert m.maxrss_before_kib - m.rss_before_kib < 16 * 1024, m
    assert "**Peak memory**" in bench_report.render_markdown(results)


def test_fallback_guard_fails_the_run(capsys):
    """A global forward hook makes every fused layer run the stock forward: exact, but no faster."""
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        code = bench.main([*TINY, "--workloads", "batch1", "--no-memory"])
    finally:
        handle.remove()
    err = capsys.readouterr().err
    assert code != 0
    assert bench_results.FALLBACK_MESSAGE in err and "hook" in err


def test_fallback_is_a_problem_of_the_results():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        results = bench.run(["tiny"], ["batch1"], candidates=["fastpath"], repeats=1, memory=False,
                            threads=1, progress=False, peers=())
    finally:
        handle.remove()
    row = results.cases[0].row("fastpath")
    assert row.fallback_calls > 0 and row.fused_calls == 0 and row.exact
    assert any(bench_results.FALLBACK_MESSAGE in problem for problem in results.problems())


def test_a_kernel_bt_plugin_lacks_is_reported_not_run(monkeypatch, capsys):
    from bt_plugin import kernels

    monkeypatch.setattr(kernels, "KERNEL_CHOICES", tuple(k for k in kernels.KERNEL_CHOICES if k != "packed"))
    assert bench.main([*TINY, "--workloads", "batch1", "--candidates", "fastpath,packed", "--no-memory"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"\| packed \| unavailable: bt_plugin .* has no 'packed' kernel", out)
    assert re.search(r"\| fastpath \| [0-9.]+ \|", out)


def test_readme_without_markers_is_refused_before_running(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    assert bench.main([*TINY, "--readme", str(readme)]) == 2
    assert "bench:start" in capsys.readouterr().err
    assert readme.read_text() == "# no markers\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=re.escape("pip install 'bt-plugin[plot]'")):
        bench.main([*TINY, "--plot", str(tmp_path / "speedup.png")])


def test_cli_lists_and_forwards_bench(capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(["--help"])
    assert raised.value.code == 0 and "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", "--help"])
    assert raised.value.code == 0 and "--quick" in capsys.readouterr().out


def test_precisions_are_timed_in_processes_of_their_own_with_quality_and_their_own_limit(tmp_path, capsys):
    """Each precision but fp32 runs in a child process; its rows join the same case, ratios to fp32
    stock, quality as the cosine of pooled outputs to fp32 stock, the limit in its own dtype.
    fastpath, which computes float32 only and steps aside under autocast, runs at fp32 alone."""
    out_json = tmp_path / "results.json"
    argv = ["bench", *TINY, "--workloads", "text", "--candidates", "stock,fastpath,packed", "--no-memory",
            "--precisions", "autocast,bf16,bf16-weights", "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["problems"] == []
    [case] = data["cases"]
    rows = {(row["candidate"], row["precision"]): row for row in case["rows"]}
    assert set(rows) == {("stock", "fp32"), ("fastpath", "fp32"), ("packed", "fp32"), ("stock", "autocast"),
                         ("packed", "autocast"),
                         ("packed", "bf16"), ("stock", "bf16-weights"), ("packed", "bf16-weights")}
    stock = rows["stock", "fp32"]
    for (name, precision), row in rows.items():
        assert row["ratio_to_stock"] == pytest.approx(stock["median_ms"] / row["median_ms"])
        if precision == "fp32":
            assert row["min_cosine"] is None and row["exact"]
            continue
        assert bench_results.QUALITY_FLOOR <= row["min_cosine"] <= 1 + 1e-6, row
        assert row["matmul_gflops"] and row["share_of_limit"]
        assert f"| {name} {precision} |" in printed
        if name == "packed":
            assert row["fused_calls"] > 0 and row["fallback_calls"] == 0, row
    assert "AMX-BF16" in printed or "CPU native precisions: " in printed


def test_an_unknown_precision_is_refused_naming_the_valid_ones(capsys):
    assert cli.main(["bench", *TINY, "--precisions", "int4"]) == 2
    assert "unknown precision int4; valid: fp32, bf16-weights, autocast, bf16" in capsys.readouterr().err


def test_query_and_small_batch_cases_are_real_short_texts():
    """query: one real short query per call, in arrival order, nothing padded; small-batch: one
    case per size, padded batches of real queries (a search service's requests)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bench_models.minilm_dir()))
    [query] = bench_cases.query_cases("minilm", tokenizer, seed=0)
    assert len(query.batches) == bench_settings.QUERY_CALLS and query.real_fraction == 1.0
    lengths = [int(b["attention_mask"].sum()) for b in query.batches]
    assert all(b["input_ids"].shape[0] == 1 for b in query.batches)
    assert 8 <= sorted(lengths)[len(lengths) // 2] <= 40 and len(set(lengths)) > 1  # search-query lengths, varied
    texts = bench_cases.queries(bench_settings.QUERY_CALLS, 0)
    assert torch.equal(query.batches[0]["input_ids"], tokenizer(texts[0], return_tensors="pt")["input_ids"])
    small = bench_cases.small_batch_cases("minilm", tokenizer, seed=0)
    assert [c.batches[0]["input_ids"].shape[0] for c in small] == list(bench_settings.SMALL_BATCH_SIZES)
    for case in small:
        assert len(case.batches) == bench_settings.SMALL_BATCH_CALLS and 0.3 < case.real_fraction < 1.0
        assert all(b["attention_mask"][:, 0].all() for b in case.batches)  # right-padded, every row real
    left = bench_cases.small_batch_cases("qwen3-0.6b", tokenizer, seed=0, padding_side="left")
    assert all(b["attention_mask"][:, -1].all() for c in left for b in c.batches)


def test_document_cases_are_real_paragraphs_of_100_to_200_tokens_one_per_call():
    """document: DOCUMENT_CALLS real paragraphs, one per call, unpadded, each DOCUMENT_TOKENS long with
    the shape's tokenizer; the same for the same seed; run wherever query runs by default."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bench_models.minilm_dir()))
    [document] = bench_cases.document_cases("minilm", tokenizer, seed=0)
    assert document.workload == "document" and document.real_fraction == 1.0
    assert len(document.batches) == bench_settings.DOCUMENT_CALLS == 8
    low, high = bench_settings.DOCUMENT_TOKENS
    lengths = [b["input_ids"].shape[1] for b in document.batches]
    assert all(b["input_ids"].shape[0] == 1 for b in document.batches)
    assert (low, high) == (100, 200) and all(low <= n <= high for n in lengths) and len(set(lengths)) > 1
    texts = bench_cases.documents(bench_settings.DOCUMENT_CALLS, 0, tokenizer)
    assert len(set(texts)) == len(texts) and set(texts) <= set(corpus.paragraphs())
    assert torch.equal(document.batches[0]["input_ids"], tokenizer(texts[0], return_tensors="pt")["input_ids"])
    [again] = bench_cases.document_cases("minilm", tokenizer, seed=0)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(document.batches, again.batches))
    assert bench_cases.documents(bench_settings.DOCUMENT_CALLS, 1, tokenizer) != texts
    for quick in (False, True):
        plan = bench_settings.make_settings(list(bench_settings.SHAPES), None, None, None, quick, None, None, 0,
                                            peers=()).plan()
        assert {s for s, w in plan if w == "query"} == {s for s, w in plan if w == "document"}
        assert ("minilm", "document") in plan


def test_sorted_text_is_the_text_workloads_paragraphs_sorted_by_length():
    """sorted-text: the same paragraphs as text, longest first, batched as sentence-transformers'
    encode batches them (less padding than arrival order); in the quick plan, asked for otherwise."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(bench_models.minilm_dir()))
    [text] = bench_cases.text_cases("minilm", 2, tokenizer, seed=0)
    [ordered] = bench_cases.sorted_text_cases("minilm", 2, tokenizer, seed=0)
    assert ordered.workload == "sorted-text" and len(ordered.batches) == len(text.batches) == 2
    lengths = [int(n) for mask in ordered.masks for n in mask.sum(dim=1)]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(lengths) == sorted(int(n) for mask in text.masks for n in mask.sum(dim=1))
    assert ordered.real_fraction > text.real_fraction
    default = bench_settings.make_settings(None, None, None, None, False, None, None, 0, peers=()).plan()
    quick = bench_settings.make_settings(None, None, None, None, True, None, None, 0, peers=()).plan()
    assert not any(w == "sorted-text" for _, w in default) and ("minilm", "sorted-text") in quick
    asked = bench_settings.make_settings(["minilm"], ["sorted-text"], None, None, False, None, None, 0, peers=())
    assert asked.plan() == [("minilm", "sorted-text")]


def test_onnx_runtime_is_a_peer_row_timed_in_its_own_process(tmp_path, capsys):
    """With onnxruntime installed, its row joins the same cases (the export of stock's weights,
    compared with stock on real tokens), ratios to stock; a peer is shown, never judged."""
    from bt_plugin.tools.bench import peers

    assert "onnxruntime" in peers.installed_peers()  # the test extra installs the peers extra
    out_json = tmp_path / "results.json"
    argv = ["bench", *TINY, "--workloads", "batch1,small-batch", "--candidates", "stock,packed", "--no-memory",
            "--peers", "onnxruntime", "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads(out_json.read_text())
    assert data["problems"] == [] and len(data["cases"]) == 1 + len(bench_settings.SMALL_BATCH_SIZES)
    for case in data["cases"]:
        rows = {row["candidate"]: row for row in case["rows"]}
        assert list(rows) == ["stock", "packed", "onnxruntime"]
        peer = rows["onnxruntime"]
        assert peer["max_abs_diff"] <= 1e-4 and peer["fused_calls"] is None and peer["median_ms"] > 0
        assert peer["ratio_to_stock"] == pytest.approx(rows["stock"]["median_ms"] / peer["median_ms"])
        assert peer["share_of_limit"] and peer["share_of_ideal"]
    assert "| onnxruntime |" in printed
    judged = bench_results.CaseResult("tiny", "batch1", "1 x 1 x 16", 1.0,
                                      [bench_results.CandidateResult("onnxruntime", [1.0], max_abs_diff=1.0)])
    assert bench_results.BenchResults(bench_settings.Settings(), {}, [judged]).problems() == []


def test_an_unknown_or_missing_peer_is_refused_naming_the_valid_ones(capsys, monkeypatch):
    assert cli.main(["bench", *TINY, "--peers", "tensorrt"]) == 2
    assert "unknown peer tensorrt; valid: onnxruntime, openvino-f32, openvino" in capsys.readouterr().err
    from bt_plugin.tools.bench import peers

    monkeypatch.setattr(peers, "installed_peers", lambda: ())
    assert cli.main(["bench", *TINY, "--peers", "onnxruntime"]) == 2
    assert "pip install 'bt-plugin[peers]'" in capsys.readouterr().err
    assert bench_settings.make_settings(["tiny"], None, None, 1, False, False, 1, 0).peers == ()


def test_openvino_f32_returns_stocks_last_hidden_state(tmp_path):
    """openvino-f32: stock's model converted and compiled at f32 gives stock's last_hidden_state on
    real tokens (unpadded and padded batches of other sizes than the traced one)."""
    import transformers

    from bt_plugin.tools.bench import peers

    assert {"openvino-f32", "openvino"} <= set(peers.installed_peers())  # the test extra installs them
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                                     vocab_size=2000)
    model = transformers.BertModel(config).eval()
    served = peers.peer_model("openvino-f32", model, tmp_path, threads=1)
    assert served.computes_in == "f32" and bench_timing.peer_precision("openvino-f32", served) is None
    for seed, lengths in enumerate(([5], [40, 9, 1], [16, 16])):
        batch = bench_cases.random_batch(lengths, max(lengths), config.vocab_size, seed)
        with torch.inference_mode():
            expected = model(**batch).last_hidden_state
        got = served(**batch)
        real = batch["attention_mask"].bool()
        assert got.shape == expected.shape and (got[real] - expected[real]).abs().max() <= 1e-4


def test_openvino_peers_are_rows_each_timed_in_a_process_of_its_own(tmp_path, capsys, monkeypatch):
    """openvino-f32 and openvino: two child processes (one each), their rows joining the same cases;
    the default precision is named in its row and, below f32, judged by cosine with its own limit."""
    from bt_plugin.tools.bench import runner

    commands = []
    run = runner.subprocess.run
    monkeypatch.setattr(runner.subprocess, "run", lambda command, **kw: commands.append(command) or run(command, **kw))
    out_json = tmp_path / "results.json"
    argv = ["bench", *TINY, "--workloads", "batch1,small-batch", "--candidates", "stock,packed", "--no-memory",
            "--peers", "openvino-f32,openvino", "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    peer_processes = [c[c.index("--peer-of-this-process") + 1] for c in commands if "--peer-of-this-process" in c]
    assert peer_processes == ["openvino-f32", "openvino"]
    data = json.loads(out_json.read_text())
    assert data["problems"] == []
    for case in data["cases"]:
        rows = {row["candidate"]: row for row in case["rows"]}
        assert list(rows) == ["stock", "packed", "openvino-f32", "openvino"]
        f32, default = rows["openvino-f32"], rows["openvino"]
        assert f32["computes_in"] is None and f32["max_abs_diff"] <= 1e-4 and f32["min_cosine"] is None
        assert f32["share_of_limit"] and f32["matmul_gflops"] is None  # the candidates' fp32 rate, the case's
        assert default["computes_in"] in ("bf16", "f32") and default["median_ms"] > 0
        if default["computes_in"] == "bf16":  # a CPU with AMX or AVX512-BF16
            assert default["exact"] and default["min_cosine"] >= bench_results.QUALITY_FLOOR
            assert default["matmul_gflops"] and default["matmul_gflops"] != case["matmul_gflops"]  # its bf16 rate
            assert default["share_of_ideal"] is None  # no stock autocast row to compare with
    assert "| openvino-f32 |" in printed and re.search(r"\| openvino \((bf16|f32)\) \|", printed)


def test_inductor_peers_run_only_when_named_and_need_a_compiler(monkeypatch, capsys):
    """The compiling peers (torch.compile) are never a default (tens of seconds of compile per model)
    and run on torch's own thread pool (their process keeps the candidates' OpenMP settings); without
    a C++ compiler on PATH they are not installed, and naming them says why."""
    from bt_plugin.tools.bench import peers

    assert {"inductor", "inductor-bf16"} <= set(peers.installed_peers())  # this machine has g++
    assert not {"inductor", "inductor-bf16"} & set(peers.default_peers())
    assert set(peers.default_peers()) == set(peers.installed_peers()) - {"inductor", "inductor-bf16"}
    assert bench_settings.make_settings(["tiny"], None, None, 1, False, False, 1, 0).peers == peers.default_peers()
    assert peers.peer_environment("inductor") == {} and peers.peer_environment("openvino") == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(peers.shutil, "which", lambda name: None)
    assert "inductor" not in peers.installed_peers() and "openvino" in peers.installed_peers()
    assert cli.main(["bench", *TINY[:-2], "--peers", "inductor"]) == 2
    assert "need a C++ compiler on PATH" in capsys.readouterr().err


def test_inductor_peers_return_stocks_last_hidden_state(tmp_path):
    """inductor: stock's model compiled (fp32, freezing, dynamic shapes) gives stock's
    last_hidden_state on real tokens within the fp32 tolerance, for batches of several shapes;
    inductor-bf16 computes in bf16 on a copy (stock's own weights stay fp32) and is judged by cosine.
    Each counts its compile as warm-up seconds."""
    import transformers

    from bt_plugin.tools.bench import peers

    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                                     vocab_size=2000)
    model = transformers.BertModel(config).eval()
    batches = [bench_cases.random_batch(lengths, max(lengths), config.vocab_size, seed)
               for seed, lengths in enumerate(([5], [9], [40, 9, 1]))]
    with torch.inference_mode():
        expected = [model(**batch).last_hidden_state for batch in batches]
    served = peers.peer_model("inductor", model, tmp_path, threads=1)
    assert served.computes_in == "f32" and bench_timing.peer_precision("inductor", served) == "f32"
    served.warm_up(batches)
    assert served.warm_up_s > 0
    for batch, want in zip(batches, expected):
        got = served(**batch)
        real = batch["attention_mask"].bool()
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert (got[real] - want[real]).abs().max() <= bench_results.TOLERANCE
    reduced = peers.peer_model("inductor-bf16", model, tmp_path, threads=1)
    assert model.embeddings.word_embeddings.weight.dtype == torch.float32  # cast on a copy
    assert bench_timing.peer_precision("inductor-bf16", reduced) == "bf16"
    row = bench_results.CandidateResult("inductor-bf16", [1.0], computes_in="bf16", warm_up_s=12.3,
                                       max_abs_diff=0.01, min_cosine=1.0)
    assert row.reduced and row.label == "inductor-bf16"
    case = bench_results.CaseResult("tiny", "query", "1 x 1 x 5", 1.0, [row])
    assert "| inductor-bf16 (compiled in 12 s) |" in bench_report.markdown_table(
        bench_report.CASE_COLUMNS, [bench_report._row_cells(case, row)])
    with torch.inference_mode():
        got = reduced(**batches[2])
    real = batches[2]["attention_mask"].bool()
    cosine = torch.nn.functional.cosine_similarity(got[real], expected[2][real], dim=-1)
    assert got.dtype == torch.float32 and cosine.min() > 0.99
