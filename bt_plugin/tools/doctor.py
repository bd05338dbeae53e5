"""`python -m bt_plugin doctor`: versions, the zero-code hook, the flags, the registered families."""

from __future__ import annotations

import json
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Any

PTH_NAME = "bt_plugin.pth"
PACKAGES = ("torch", "transformers", "wrapt", "bt-plugin")


def versions() -> dict[str, str | None]:
    """Python and the installed versions of bt_plugin's dependencies (None when missing); torch's
    as the build names itself (`torch.__version__`)."""
    import importlib_metadata

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            found[name] = None
    if found["torch"] is not None:
        found["torch"] = torch_build_version(found["torch"])
    return found


def torch_build_version(installed: str) -> str:
    """`torch.__version__`, with the build's label (`2.14.1+cu130`, `2.13.0+cpu`): PyPI's CUDA wheels
    record `2.14.1` in their metadata, so which build is installed shows only here. The metadata's
    version where torch does not import."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - a broken torch install: doctor still reports what it can
        return installed
    return str(torch.__version__)


def site_dirs() -> list[str]:
    """The site-packages directories the `.pth` hook may live in, without duplicates."""
    dirs = list(getattr(site, "getsitepackages", lambda: [])())
    dirs.append(sysconfig.get_paths()["purelib"])
    return list(dict.fromkeys(str(Path(d)) for d in dirs))


def pth_files() -> list[str]:
    """Paths of installed `bt_plugin.pth` hooks."""
    return [str(Path(d) / PTH_NAME) for d in site_dirs() if (Path(d) / PTH_NAME).is_file()]


def flags(environ=os.environ) -> dict[str, Any]:
    """BT_PLUGIN / BT_PLUGIN_KERNEL / BT_PLUGIN_PRECISION / BT_PLUGIN_PREPACK values, whether they
    parse, and a warning line if not."""
    from bt_plugin._boot import FLAG, KERNEL_FLAG, PRECISION_FLAG, PREPACK_FLAG, parse_flag
    from bt_plugin.kernels import KERNEL_CHOICES
    from bt_plugin.precision import PRECISION_CHOICES

    value, kernel, precision = environ.get(FLAG), environ.get(KERNEL_FLAG), environ.get(PRECISION_FLAG)
    state = parse_flag(value)
    warnings = []
    if state is None:
        warnings.append(f"{FLAG}={value!r} is malformed: the plugin stays off "
                        f"(use 1/true/yes/on or 0/false/no/off)")
    if kernel is not None and (kernel.strip() or "auto") not in KERNEL_CHOICES:
        warnings.append(f"{KERNEL_FLAG}={kernel!r} is malformed: valid kernels are {', '.join(KERNEL_CHOICES)}")
    if precision is not None and (precision.strip().lower() or "fp32") not in PRECISION_CHOICES:
        warnings.append(f"{PRECISION_FLAG}={precision!r} is malformed: valid precisions are "
                        f"{', '.join(PRECISION_CHOICES)} (the plugin is not enabled with it)")
    prepack = environ.get(PREPACK_FLAG)
    if parse_flag(prepack) is None:
        warnings.append(f"{PREPACK_FLAG}={prepack!r} is malformed: use 1/true/yes/on or 0/false/no/off "
                        "(the plugin is not enabled with it)")
    return {FLAG: value, "flag_enabled": state, KERNEL_FLAG: kernel, PRECISION_FLAG: precision,
            PREPACK_FLAG: prepack, "warnings": warnings}


def precisions() -> dict[str, Any]:
    """The CPU's native reduced precisions and what `precision="auto"` computes in, with why."""
    from bt_plugin.precision import auto_choice, auto_rule, native_precisions

    from bt_plugin.kernels import torch_ops
    from bt_plugin.kernels.linear import prepack_available

    choice, why = auto_choice("cpu")
    return {"native": native_precisions(), "auto": choice, "why": why, "auto_per_call": auto_rule("cpu"),
            "prepack_available": prepack_available(),
            "unavailable_ops": torch_ops.unavailable(),
            "held_beside_parameters": HELD_BESIDE_PARAMETERS}


# What each setting holds beside a converted model's parameters (bt_plugin.dispatch.derived); a
# model's own figure in bytes is `bt_plugin.explain(model).held_bytes`.
HELD_BESIDE_PARAMETERS = {
    "fp32 (default)": "nothing (q/k/v are views of one fused tensor)",
    "precision='bf16'": "a bf16 copy of the fused layers' matrix weights (half their fp32 bytes), prepacked",
    "prepack=True": "a prepacked copy of the fused layers' matrix weights (their bytes once more)",
}


def hook_active() -> bool:
    """Whether the from_pretrained patch is installed in this process (after importing transformers)."""
    import transformers.modeling_utils  # noqa: F401  (lets the .pth hook activate, if it is armed)

    from bt_plugin.loading.patching import is_patched

    return is_patched()


def families() -> list[dict[str, Any]]:
    """Each registered family with its model types and where it comes from: bt_plugin's own
    `bt_plugin.patches`, or a third-party distribution's entry point."""
    from bt_plugin.loading.registry import _load_entry_point, absent_families, builtin_specs, third_party_entry_points

    absent = absent_families()
    rows = [{"family": spec.name, "entry_point": None, "distribution": "bt-plugin", "built_in": True,
             "model_types": list(spec.model_types), "error": None, "absent": absent.get(spec.name)}
            for spec in builtin_specs()]
    for entry_point in third_party_entry_points():
        dist = entry_point.dist.name if entry_point.dist else None
        try:
            specs = _load_entry_point(entry_point)
        except Exception as error:
            rows.append({"family": None, "entry_point": entry_point.name, "distribution": dist, "built_in": False,
                         "model_types": [], "error": f"{type(error).__name__}: {error}", "absent": None})
            continue
        for spec in specs:
            rows.append({"family": spec.name, "entry_point": entry_point.name, "distribution": dist,
                         "built_in": False, "model_types": list(spec.model_types), "error": None,
                         "absent": absent.get(spec.name)})
    return rows


def diagnose() -> dict[str, Any]:
    """Everything `doctor` reports, as plain data."""
    flag_info = flags()
    patched = hook_active()
    return {
        "versions": versions(),
        "pth_installed": pth_files(),
        "flags": flag_info,
        "active": bool(flag_info["flag_enabled"]) and patched,
        "patched": patched,
        "precision": precisions(),
        "families": families(),
    }


def format_text(report: dict[str, Any]) -> str:
    """A human-readable rendering of `diagnose()`."""
    lines = ["versions:"]
    lines += [f"  {name:<13} {version or 'not installed'}" for name, version in report["versions"].items()]
    pth = report["pth_installed"]
    lines.append(f"bt_plugin.pth: {'installed at ' + ', '.join(pth) if pth else 'not installed in site-packages'}")
    flag_info = report["flags"]
    lines.append(f"BT_PLUGIN={flag_info['BT_PLUGIN']!r} BT_PLUGIN_KERNEL={flag_info['BT_PLUGIN_KERNEL']!r} "
                 f"BT_PLUGIN_PRECISION={flag_info['BT_PLUGIN_PRECISION']!r} "
                 f"BT_PLUGIN_PREPACK={flag_info['BT_PLUGIN_PREPACK']!r}")
    lines += [f"warning: {warning}" for warning in flag_info["warnings"]]
    lines.append(f"zero-code hook active in this process: {'yes' if report['active'] else 'no'} "
                 f"(from_pretrained patched: {'yes' if report['patched'] else 'no'})")
    precision = report["precision"]
    lines.append(f"CPU native precisions: {', '.join(precision['native']) or 'none (fp32 only)'}")
    lines.append(f"precision='auto' computes in: {precision['auto']} ({precision['why']})")
    lines.append(f"  per call: {precision['auto_per_call']}")
    lines.append(f"oneDNN weight prepacking in this torch: {'yes' if precision['prepack_available'] else 'no'}")
    lines += [f"private torch operator unavailable: {why}" for why in precision["unavailable_ops"]]
    lines.append("held beside the parameters of a converted model (explain(model).held_bytes gives a model's bytes):")
    lines += [f"  {setting:<17} {what}" for setting, what in precision["held_beside_parameters"].items()]
    lines.append("registered families:")
    for row in report["families"]:
        if row["error"]:
            lines.append(f"  [broken entry point {row['entry_point']!r} from {row['distribution']}]: {row['error']}")
        else:
            source = " (built in)" if row["built_in"] else f" (entry point {row['entry_point']})"
            lines.append(f"  {row['family']:<26} from {row['distribution']}{source}: {', '.join(row['model_types'])}")
            if row["absent"]:
                lines.append(f"  {'':<26} skipped: {row['absent']}")
    return "\n".join(lines)


def run(as_json: bool = False) -> int:
    """Print the report; always 0 (doctor informs, it does not judge)."""
    report = diagnose()
    print(json.dumps(report) if as_json else format_text(report))
    return 0
