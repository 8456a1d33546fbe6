"""Stage ``pack``: the finished quantize run as a GPTQ-layout Hugging Face checkpoint.

    python -m stages.pack

Reads the FP model (``model.path``) and the solver's integer weights, scales, zeros and g_idx
(``data/quantize/layer_XXX/solved.safetensors``) and writes ``pack.out_dir`` (default
``data/packed``): ``model.safetensors`` (``qweight``/``qzeros``/``scales``/``g_idx`` per quantized
linear, everything else FP), ``config.json`` with ``quantization_config``, the processor files and
``vlmq_manifest.json`` (sha256 of every file). Load it with :func:`vlmq.checkpoint.load_packed`.
"""

from __future__ import annotations

from pathlib import Path

from stages.common import call, get_logger, model_path, run_cli, stage_parser, stage_timer, write_json
from stages.params import load_params, run_name
from vlmq.state import STATE_DIR, apply_fp_tensors, read_summary, solved_file

REPORT = Path("reports/pack.json")


def pack(params_path: str | Path | None = None, state_dir: str | Path = STATE_DIR, report: str | Path = REPORT) -> dict:
    from safetensors.torch import load_file

    from vlmq.checkpoint import write_packed
    from vlmq.models import load_model

    log = get_logger("pack")
    params = load_params(params_path)
    summary = read_summary(state_dir)
    with stage_timer(log, "pack"):
        model, processor, adapter = load_model(model_path(params))
        solved = []
        for l in range(len(adapter.decoder_layers(model))):
            f = solved_file(state_dir, l)
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (the quantize run did not finish layer {l})")
            solved.append(load_file(str(f)))
            apply_fp_tensors(adapter.decoder_layers(model)[l], solved[-1], f)  # AWQ/MBQ's folded norms
        q = params.quant
        manifest = write_packed(model, processor, adapter, solved, params.pack.out_dir, bits=q.bits,
                                group_size=q.group_size, sym=q.sym, desc_act=q.act_order, method=q.method,
                                checkpoint_format=params.pack.checkpoint_format,
                                extra={"run": run_name(params), "source_model": str(params.model.path)})
    fp_bytes = sum(p.stat().st_size for p in Path(params.model.path).glob("*.safetensors"))
    packed_bytes = manifest["files"]["model.safetensors"]["bytes"]
    out = {"run": run_name(params), "out_dir": params.pack.out_dir, "checkpoint_format": manifest["checkpoint_format"],
           "fp_weights_bytes": fp_bytes, "packed_weights_bytes": packed_bytes,
           "quantize_run": summary.get("run")}
    write_json(report, out)
    log.info("pack: %s -> %s (%.2f MB, FP %.2f MB)", out["run"], out["out_dir"], packed_bytes / 1e6, fp_bytes / 1e6)
    return out


def main(argv: list[str] | None = None, runner=call):
    """The stage's command line; ``runner(name, fn, *args)`` runs the stage function (plain here,
    as a Prefect flow from ``python -m pipeline.run``)."""
    ap = stage_parser(__doc__)
    a = ap.parse_args(argv)
    return runner("pack", pack, a.params)


if __name__ == "__main__":
    run_cli(main)
