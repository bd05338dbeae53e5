"""Audio families (patches/audio.py): wav2vec2-style encoders, Whisper and Speech2Text encoders.

Each model type is built with its real defaults at realistic width (hidden 256, 4 heads, 2 layers;
a tiny 3-layer conv feature extractor for the wav2vec2 family, a short mel window for Whisper),
saved once and loaded twice through `from_pretrained`: stock, and inside `bt_plugin.enabled(kernel=K)`.
Inputs are `input_values` / `input_features` tensors (no torchaudio). Outputs are compared on real
frames (the frame-level mask the model derives from the sample-level `attention_mask`); every
comparison also checks through `explain()` that each encoder layer ran fused for that call.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.dispatch.layer import FusedLayer
from bt_plugin.patches import audio
from bt_plugin.spec import OPTIONAL_ROLES, ROLES, resolve_path
from support import present

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
LAYERS = 2
VOCAB = 1000
KERNELS = ["packed", "fastpath"]

# model_type -> (config class, base model class, task head class)
WAV2VEC2_FAMILY = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", "Wav2Vec2ForCTC"),
    "hubert": ("HubertConfig", "HubertModel", "HubertForSequenceClassification"),
    "data2vec-audio": ("Data2VecAudioConfig", "Data2VecAudioModel", "Data2VecAudioForCTC"),
    "sew": ("SEWConfig", "SEWModel", "SEWForSequenceClassification"),
    "unispeech": ("UniSpeechConfig", "UniSpeechModel", "UniSpeechForCTC"),
    "unispeech-sat": ("UniSpeechSatConfig", "UniSpeechSatModel", "UniSpeechSatForSequenceClassification"),
}
SEQ2SEQ = {
    "whisper": ("WhisperConfig", "WhisperModel", "WhisperForConditionalGeneration"),
    "speech_to_text": ("Speech2TextConfig", "Speech2TextModel", "Speech2TextForConditionalGeneration"),
}
ARCHITECTURES = {**WAV2VEC2_FAMILY, **SEQ2SEQ}
FAMILY = {**{t: "wav2vec2" for t in WAV2VEC2_FAMILY}, "sew": "sew", "whisper": "whisper", "speech_to_text": "speech_to_text"}
STABLE = ["wav2vec2", "hubert", "unispeech", "unispeech-sat"]  # have a do_stable_layer_norm variant
MEL_BINS, WHISPER_POSITIONS = 80, 32  # Whisper reads exactly 2 * max_source_positions mel frames


def make_config(model_type: str, **overrides):
    config_class = getattr(transformers, ARCHITECTURES[model_type][0])
    if model_type in WAV2VEC2_FAMILY:
        values = dict(
            hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=LAYERS,
            conv_dim=(64, 64, 64), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),  # 20x downsampling
        )
    else:
        values = dict(
            vocab_size=VOCAB, d_model=256, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_layers=LAYERS, decoder_layers=2,
            max_target_positions=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=3,
        )
        if model_type == "whisper":
            values.update(num_mel_bins=MEL_BINS, max_source_positions=WHISPER_POSITIONS, begin_suppress_tokens=None)
        else:
            values.update(conv_channels=256)  # a small conv subsampler in front of the layers
    values.update(overrides)
    return config_class(**values)


def model_class(model_type: str, head: bool):
    return getattr(transformers, ARCHITECTURES[model_type][2 if head else 1])


def fastpath_serves(model_type: str) -> bool:
    return model_type != "whisper"  # Whisper's k_proj has no bias


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def get(model_type: str, head: bool, **overrides) -> str:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(len(cache))
            model = model_class(model_type, head)(make_config(model_type, **overrides))
            directory = tmp_path_factory.mktemp(f"{model_type}-{'head' if head else 'base'}")
            model.save_pretrained(str(directory))
            cache[key] = str(directory)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def pairs(saved):
    """`pairs(model_type, kernel, head=False, **overrides)` -> (stock, loaded inside enabled(kernel))."""
    stocks: dict[tuple, torch.nn.Module] = {}
    loaded: dict[tuple, torch.nn.Module] = {}

    def get(model_type: str, kernel: str, head: bool = False, attn_implementation=None, **overrides):
        key = (model_type, head, attn_implementation, tuple(sorted(overrides.items())))
        path = saved(model_type, head, **overrides)
        cls = model_class(model_type, head)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if key not in stocks:
            stocks[key] = cls.from_pretrained(path, **kwargs).eval()
            assert not bt_plugin.is_converted(stocks[key])
        if (key, kernel) not in loaded:
            with bt_plugin.enabled(kernel=kernel):
                model = cls.from_pretrained(path, **kwargs).eval()
            if kernel == "fastpath" and not fastpath_serves(model_type):
                _assert_left_stock(model, "had no bias")
            else:
                _assert_converted(model, model_type, kernel)
            loaded[(key, kernel)] = model
        return stocks[key], loaded[(key, kernel)]

    return get


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


def _assert_converted(model, model_type: str, kernel: str, family: str | None = None) -> None:
    report = bt_plugin.explain(model)
    assert report.reason is None, str(report)
    assert report.family == (family or FAMILY[model_type])
    assert len(report.layers) == LAYERS, str(report)
    for layer in report.layers:
        assert layer.converted and layer.kernel == kernel, str(report)
        assert "decoder" not in layer.path, layer.path
    fused_paths = {name for name, module in model.named_modules() if isinstance(module, FusedLayer)}
    assert fused_paths == {layer.path for layer in report.layers}


def _assert_left_stock(model, reason_part: str) -> None:
    """Loaded inside enabled(kernel="fastpath") but not servable: every encoder layer stock, with why."""
    assert not bt_plugin.is_converted(model)
    report = bt_plugin.explain(model, kernel="fastpath")
    assert len(report.layers) == LAYERS, str(report)
    for layer in report.layers:
        assert not layer.converted and reason_part in layer.reason, str(report)


def _stats(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _run_both(stock, other, call):
    """`call(model)` on both under inference_mode. A converted model must run every encoder layer
    fused exactly once and never fall back; an unconverted one must give stock's exact output."""
    converted = bt_plugin.is_converted(other)
    before = _stats(other) if converted else None
    with torch.inference_mode():
        expected = call(stock)
        actual = call(other)
    if converted:
        report = bt_plugin.explain(other)
        for (f0, b0), (f1, b1), layer in zip(before, _stats(other), report.layers):
            assert f1 - f0 == 1, f"{layer.path} did not run fused exactly once:\n{report}"
            assert b1 == b0 == 0, f"{layer.path} fell back:\n{report}"
            assert layer.reason is None, layer.reason
    else:
        _assert_equal_outputs(expected, actual)
    assert not bt_plugin.is_converted(stock)
    return expected, actual


def _assert_equal_outputs(expected, actual) -> None:
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual)
        return
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, actual[key]), key


def _diff(want: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    assert want.shape == got.shape
    if mask is not None:
        want, got = want[mask.bool()], got[mask.bool()]
    return (want - got).abs().max().item()


def _waveforms(lengths: list[int], seed: int):
    """Right-padded `(input_values, attention_mask)` over samples."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, real in enumerate(lengths):
        values[row, :real] = torch.randn(real, generator=generator)
        mask[row, :real] = 1
    return values, mask


def _frames(model, mask: torch.Tensor, frames: int) -> torch.Tensor:
    """The frame-level mask the model derives from a sample-level (or mel-frame) attention mask."""
    return model._get_feature_vector_attention_mask(frames, mask)


def _mel(batch: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, MEL_BINS, 2 * WHISPER_POSITIONS, generator=generator)


def _fbank(lengths: list[int], seed: int):
    """Right-padded Speech2Text `(input_features (B, T, 80), attention_mask (B, T))`."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.zeros(len(lengths), max(lengths), MEL_BINS)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, real in enumerate(lengths):
        features[row, :real] = torch.randn(real, MEL_BINS, generator=generator)
        mask[row, :real] = 1
    return features, mask


def _decoder_ids(rows: int, seed: int, width: int = 5) -> torch.Tensor:
    return torch.randint(5, VOCAB - 5, (rows, width), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------

ALL_SPECS = [*audio.SPECS, audio.WAV2VEC2_STABLE_LAYER_NORM]


def test_every_spec_resolves_its_layer_classes():
    for spec in present(ALL_SPECS):
        assert len(spec.resolve_layer_classes()) == len(spec.layer_classes), spec.name
    for spec in present(audio.SPECS):
        for model_type in spec.model_types:
            assert spec in registry.specs_for_model_type(model_type), model_type
    assert audio.WAV2VEC2_STABLE_LAYER_NORM.name in registry.all_specs()
    assert {t for spec in audio.SPECS for t in spec.model_types} == set(ARCHITECTURES)


def _first_encoder_layer(model):
    return model.encoder.layers[0]  # every base model here keeps its encoder at .encoder


@pytest.mark.parametrize(
    "model_type, stable",
    [(t, False) for t in ARCHITECTURES] + [(t, True) for t in STABLE],
)
def test_every_path_resolves_on_a_real_model(model_type, stable):
    spec = audio.WAV2VEC2_STABLE_LAYER_NORM if stable else registry.spec_for_model_type(model_type)
    overrides = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"} if stable else {}
    narrow = (  # paths only: a narrower feed-forward is enough
        {"intermediate_size": 128} if model_type in WAV2VEC2_FAMILY else {"encoder_ffn_dim": 128, "decoder_ffn_dim": 128}
    )
    config = make_config(model_type, **overrides, **narrow)
    torch.manual_seed(0)
    model = model_class(model_type, head=False)(config)
    layer = _first_encoder_layer(model)
    assert isinstance(layer, spec.resolve_layer_classes())
    for role in ROLES + OPTIONAL_ROLES:
        if getattr(spec, role) is not None:
            resolve_path(layer, getattr(spec, role))
    attention = resolve_path(layer, spec.query.rpartition(".")[0])
    assert abs(attention.scaling - attention.head_dim ** -0.5) < 1e-12  # so no attention_scale
    assert spec.config_reason(config) is None
    if model_type in SEQ2SEQ:
        decoder_layer = model.decoder.layers[0]
        assert not isinstance(decoder_layer, spec.resolve_layer_classes())


# --------------------------------------------------------------------------------------------
# the wav2vec2 family: padded waveforms (frame-level masks), batch of one, hidden states, heads
# --------------------------------------------------------------------------------------------

W2V = list(WAV2VEC2_FAMILY)


@pytest.mark.parametrize("model_type", W2V)
def test_wav2vec2_family_padded_batch(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    values, mask = _waveforms([1600, 900, 400, 1250], seed=1)
    expected, actual = _run_both(stock, fused, lambda m: m(input_values=values, attention_mask=mask))
    frames = _frames(stock, mask, expected.last_hidden_state.shape[1])
    assert not bool(frames.all())  # the layers saw padding
    assert _diff(expected.last_hidden_state, actual.last_hidden_state, frames) <= ATOL


@pytest.mark.parametrize("model_type", W2V)
def test_wav2vec2_family_batch_of_one(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    values, _ = _waveforms([1100], seed=2)
    expected, actual = _run_both(stock, fused, lambda m: m(input_values=values))
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", W2V)
def test_wav2vec2_family_output_hidden_states(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    values, mask = _waveforms([700, 1500, 300], seed=3)
    expected, actual = _run_both(
        stock, fused, lambda m: m(input_values=values, attention_mask=mask, output_hidden_states=True)
    )
    frames = _frames(stock, mask, expected.last_hidden_state.shape[1])
    assert len(actual.hidden_states) == len(expected.hidden_states) == LAYERS + 1
    for index, (want, got) in enumerate(zip(expected.hidden_states, actual.hidden_states)):
        if want.shape[1] == frames.shape[1]:
            assert _diff(want, got, frames) <= ATOL, f"hidden_states[{index}]"
        else:  # SEW records the pooled frames its layers see (mask pooled as the encoder does)
            pooled = torch.nn.functional.max_pool1d(
                frames.float().unsqueeze(1), stock.config.squeeze_factor, stock.config.squeeze_factor
            ).squeeze(1)[:, : want.shape[1]]
            assert _diff(want, got, pooled) <= ATOL, f"hidden_states[{index}]"
    assert _diff(expected.last_hidden_state, actual.last_hidden_state, frames) <= ATOL


@pytest.mark.parametrize("model_type", W2V)
def test_wav2vec2_family_task_head(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel, head=True)
    assert type(fused) is model_class(model_type, head=True)
    values, mask = _waveforms([1400, 500, 1000], seed=4)
    ctc = type(fused).__name__.endswith("ForCTC")
    if ctc and kernel == "fastpath":  # CTC reads padded frames, which fastpath drops: stock runs
        with torch.inference_mode():
            assert torch.equal(stock(input_values=values, attention_mask=mask).logits,
                               fused(input_values=values, attention_mask=mask).logits)
        assert all("reads every position" in layer.reason for layer in bt_plugin.explain(fused).layers)
        return
    expected, actual = _run_both(stock, fused, lambda m: m(input_values=values, attention_mask=mask))
    # CTC logits per frame, padded frames included (decoding reads them); sequence classification
    # mean-pools the real frames
    assert _diff(expected.logits, actual.logits) <= ATOL


def test_wav2vec2_layer_norm_feature_extractor_with_eager_mask(kernel, pairs):
    """feat_extract_norm="layer" checkpoints are the ones run with attention masks; eager attention
    hands the layers a float additive mask."""
    stock, fused = pairs("wav2vec2", kernel, attn_implementation="eager", feat_extract_norm="layer")
    values, mask = _waveforms([1300, 600, 1600], seed=5)
    expected, actual = _run_both(stock, fused, lambda m: m(input_values=values, attention_mask=mask))
    frames = _frames(stock, mask, expected.last_hidden_state.shape[1])
    assert _diff(expected.last_hidden_state, actual.last_hidden_state, frames) <= ATOL


@pytest.mark.parametrize("model_type", ["wav2vec2", "whisper"])
def test_output_attentions_falls_back_exactly(model_type, saved):
    """A call the kernels cannot serve runs the stock forward, with the reason in explain()."""
    path = saved(model_type, False)
    cls = model_class(model_type, head=False)
    stock = cls.from_pretrained(path, attn_implementation="eager").eval()
    with bt_plugin.enabled(kernel="packed"):
        fused = cls.from_pretrained(path, attn_implementation="eager").eval()
    if model_type == "whisper":
        inputs = {"input_features": _mel(2, seed=15), "decoder_input_ids": _decoder_ids(2, seed=16)}
    else:
        values, mask = _waveforms([900, 1500], seed=15)
        inputs = {"input_values": values, "attention_mask": mask}
    with torch.inference_mode():
        expected = stock(**inputs, output_attentions=True)
        actual = fused(**inputs, output_attentions=True)
    report = bt_plugin.explain(fused)
    for layer in report.layers:
        assert (layer.fused_calls, layer.fallback_calls) == (0, 1), str(report)
        assert "output_attentions" in layer.reason, str(report)
    attentions = "encoder_attentions" if model_type == "whisper" else "attentions"
    assert len(getattr(actual, attentions)) == LAYERS
    for want, got in zip(getattr(expected, attentions), getattr(actual, attentions)):
        assert torch.equal(want, got)


# --------------------------------------------------------------------------------------------
# do_stable_layer_norm: the pre-LN spec, picked by the registry from the config
# --------------------------------------------------------------------------------------------

STABLE_OVERRIDES = {"do_stable_layer_norm": True, "feat_extract_norm": "layer"}


@pytest.mark.parametrize("model_type", STABLE)
def test_stable_layer_norm_variant_is_chosen_by_its_config(model_type, saved):
    """Two specs serve the model type; `do_stable_layer_norm` picks the pre-LN one."""
    path = saved(model_type, False, **STABLE_OVERRIDES)
    with bt_plugin.enabled(kernel="packed"):
        model = model_class(model_type, head=False).from_pretrained(path).eval()
    assert bt_plugin.is_converted(model)
    assert bt_plugin.explain(model).family == audio.WAV2VEC2_STABLE_LAYER_NORM.name


@pytest.mark.parametrize("model_type", STABLE)
def test_stable_layer_norm_spec_is_exact_when_selected(model_type, kernel, saved, monkeypatch):
    """The pre-LN spec, selected by the registry from the config: fused, exact on a padded batch
    and with hidden states."""
    spec = audio.WAV2VEC2_STABLE_LAYER_NORM
    path = saved(model_type, False, **STABLE_OVERRIDES)
    cls = model_class(model_type, head=False)
    stock = cls.from_pretrained(path).eval()
    fused = bt_plugin.convert(cls.from_pretrained(path).eval(), kernel=kernel)
    _assert_converted(fused, model_type, kernel, family=spec.name)
    values, mask = _waveforms([1500, 350, 900], seed=6)
    expected, actual = _run_both(stock, fused, lambda m: m(input_values=values, attention_mask=mask))
    frames = _frames(stock, mask, expected.last_hidden_state.shape[1])
    assert _diff(expected.last_hidden_state, actual.last_hidden_state, frames) <= ATOL
    expected, actual = _run_both(
        stock, fused, lambda m: m(input_values=values, attention_mask=mask, output_hidden_states=True)
    )
    for index, (want, got) in enumerate(zip(expected.hidden_states, actual.hidden_states)):
        assert _diff(want, got, frames) <= ATOL, f"hidden_states[{index}]"


def test_stable_layer_norm_spec_refuses_attention_adapters():
    config = make_config("wav2vec2", adapter_attn_dim=16, **STABLE_OVERRIDES)
    assert "adapter_attn_dim" in audio.WAV2VEC2_STABLE_LAYER_NORM.config_reason(config)
    assert "do_stable_layer_norm" in audio.WAV2VEC2.config_reason(config)


# --------------------------------------------------------------------------------------------
# Whisper and Speech2Text encoders (decoders stay stock)
# --------------------------------------------------------------------------------------------


def _speech_inputs(model_type: str, batch: int, seed: int, padded: bool = True):
    """`(kwargs, frame mask or None)` for the encoder of a speech seq2seq model."""
    if model_type == "whisper":  # fixed 30 s windows: no attention mask, nothing padded
        return {"input_features": _mel(batch, seed)}, None
    lengths = [90, 41, 67, 120][:batch] if padded and batch > 1 else [77] * batch
    features, mask = _fbank(lengths, seed)
    return {"input_features": features, "attention_mask": mask}, mask


def _encoder_frames(model, mask, frames: int):
    return None if mask is None else _frames(model, mask, frames)


@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_speech_encoder_batch(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    inputs, mask = _speech_inputs(model_type, 3, seed=7)
    decoder_ids = _decoder_ids(3, seed=8)
    expected, actual = _run_both(stock, fused, lambda m: m(**inputs, decoder_input_ids=decoder_ids))
    frames = _encoder_frames(stock, mask, expected.encoder_last_hidden_state.shape[1])
    if frames is not None:
        assert not bool(frames.all())
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state, frames) <= ATOL
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_speech_encoder_batch_of_one(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    inputs, _ = _speech_inputs(model_type, 1, seed=9)
    inputs.pop("attention_mask", None)
    decoder_ids = _decoder_ids(1, seed=10)
    expected, actual = _run_both(stock, fused, lambda m: m(**inputs, decoder_input_ids=decoder_ids))
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state) <= ATOL
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_speech_encoder_output_hidden_states(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    inputs, mask = _speech_inputs(model_type, 2, seed=11)
    decoder_ids = _decoder_ids(2, seed=12)
    expected, actual = _run_both(
        stock, fused, lambda m: m(**inputs, decoder_input_ids=decoder_ids, output_hidden_states=True)
    )
    frames = _encoder_frames(stock, mask, expected.encoder_last_hidden_state.shape[1])
    assert len(actual.encoder_hidden_states) == len(expected.encoder_hidden_states) == LAYERS + 1
    for index, (want, got) in enumerate(zip(expected.encoder_hidden_states, actual.encoder_hidden_states)):
        assert _diff(want, got, frames) <= ATOL, f"encoder_hidden_states[{index}]"
    for index, (want, got) in enumerate(zip(expected.decoder_hidden_states, actual.decoder_hidden_states)):
        assert _diff(want, got) <= ATOL, f"decoder_hidden_states[{index}]"


@pytest.mark.parametrize("model_type", list(SEQ2SEQ))
def test_speech_task_head_logits_and_generate(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel, head=True)
    assert type(fused) is model_class(model_type, head=True)
    inputs, mask = _speech_inputs(model_type, 3, seed=13)
    decoder_ids = _decoder_ids(3, seed=14, width=6)
    expected, actual = _run_both(stock, fused, lambda m: m(**inputs, decoder_input_ids=decoder_ids))
    assert _diff(expected.logits, actual.logits) <= ATOL

    def generate(model):
        return model.generate(
            **inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,  # min: no early eos
            output_scores=True, return_dict_in_generate=True,
        )

    expected, actual = _run_both(stock, fused, generate)  # the encoder runs once per generate()
    assert torch.equal(expected.sequences, actual.sequences), f"{expected.sequences}\n{actual.sequences}"
    assert len(expected.scores) == len(actual.scores) == 5
    for want, got in zip(expected.scores, actual.scores):  # processed logits: -inf where suppressed
        assert torch.equal(torch.isfinite(want), torch.isfinite(got))
        assert _diff(want, got, torch.isfinite(want)) <= ATOL
    assert not any(isinstance(m, FusedLayer) for m in fused.get_decoder().modules())


# SEW before transformers 5.13 (its squeezed mask rounded down, so its encoder upsampled padded
# positions into real frames): the registry skips the family; the model must stay stock, exactly.
SEW_ABSENT = [registry.absent_families()["sew"]] if "sew" in registry.absent_families() else []


@pytest.mark.parametrize("reason", SEW_ABSENT)
def test_sew_stays_stock_where_its_encoder_reads_padding(reason, tmp_path):
    torch.manual_seed(0)
    transformers.SEWModel(make_config("sew")).save_pretrained(tmp_path)
    stock = transformers.SEWModel.from_pretrained(tmp_path).eval()
    with bt_plugin.enabled():
        loaded = transformers.SEWModel.from_pretrained(tmp_path).eval()
    assert not bt_plugin.is_converted(loaded) and reason in bt_plugin.explain(loaded).reason
    values, mask = _waveforms([1600, 900, 400, 1250], seed=1)
    with torch.inference_mode():
        want = stock(input_values=values, attention_mask=mask).last_hidden_state
        got = loaded(input_values=values, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)
