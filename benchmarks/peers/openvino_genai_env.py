"""OpenVINO GenAI's own virtual environment (benchmarks/.venv-ovgenai, gitignored) and optimum-intel's
export of a diffusers folder to OpenVINO IR, the way its users get a model for Text2ImagePipeline:

    python benchmarks/peers/openvino_genai_env.py create                 # once; a few minutes, from PyPI
    python benchmarks/peers/openvino_genai_env.py export SRC_DIFFUSERS OUT_DIR

The venv holds openvino-genai (the pipeline the worker runs, no torch imported there), openvino-tokenizers (the
tokenizer as an OpenVINO model) and optimum-intel (the exporter: `optimum-cli export openvino`, with torch from
the machine's CPU wheel), pinned by openvino-genai-constraints.txt. optimum-intel also pulls torchvision, whose
only wheels on the package index are CUDA builds that cannot load their operators beside the CPU torch (and then
break transformers' imports): it is uninstalled again; exporting a text-to-image model does not use it.

The export keeps fp32 weights (`--weight-format fp32`); the pipeline then runs them at the precision it is asked
for. openvino-tokenizers cannot convert the benchmark's word-level tokenizer as it is (its Punctuation
pre-tokenizer's "isolated" split mode is not implemented), so `tokenizer` converts it without that step, which
changes nothing for prompts without punctuation, and checks the ids against transformers' for the given
prompts. Standard library only at import time (the subcommands import what they need inside the venv).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

if __package__:
    from .peer_env import PeerEnv, PeerEnvError
else:  # run as a script
    from peer_env import PeerEnv, PeerEnvError

HERE = Path(__file__).resolve().parent
ENV = PeerEnv(
    name="OpenVINO GenAI",
    venv=HERE.parent / ".venv-ovgenai",
    requirements=("openvino-genai", "openvino-tokenizers", "openvino", "optimum-intel[openvino]", "diffusers", "torch"),
    constraints=HERE / "openvino-genai-constraints.txt",
    probe="import openvino_genai, openvino_tokenizers, optimum.intel, diffusers; from transformers import PreTrainedModel",
    remove=("torchvision",),
)
OV_TOKENIZER = "openvino_tokenizer.xml"
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")  # a diffusers folder's tokenizers: SD has the first, SDXL both


def export(source: Path, out: Path, log_file: Path | None = None, prompts: tuple[str, ...] = ()) -> Path:
    """`optimum-cli export openvino` of the diffusers folder `source` into `out` (fp32 weights), then its tokenizer
    as an OpenVINO model where the exporter could not convert it (checked on `prompts`); PeerEnvError naming
    the log when either fails. Run from any python: both steps run in the venv."""
    cli = ENV.venv / "bin" / "optimum-cli"
    checks = [a for p in prompts for a in ("--check", p)]
    steps = [[str(cli), "export", "openvino", "--model", str(source), "--task", "text-to-image", "--weight-format", "fp32", str(out)]]
    # SDXL has a second tokenizer (tokenizer_2/), which the pipeline reads as an OpenVINO model too.
    steps += [[str(ENV.python), __file__, "tokenizer", str(out / name), *checks] for name in TOKENIZER_FOLDERS if (source / name).is_dir()]
    with open(log_file, "a") if log_file is not None else open(os.devnull, "w") as f:
        for command in steps:
            if subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise PeerEnvError(f"OpenVINO export of {source} failed at `{' '.join(command[:3])}`" + (f"; see {log_file}" if log_file else ""))
    return out


def convert_tokenizer(folder: Path, prompts: list[str]) -> Path:
    """folder/openvino_tokenizer.xml from folder/tokenizer.json (run in the venv); a no-op where the exporter
    wrote it. The Punctuation pre-tokenizer is dropped (see the module docstring); the OpenVINO tokenizer's
    ids must equal transformers' on the original tokenizer for every prompt in `prompts`."""
    import json
    import tempfile

    import openvino as ov
    import openvino_tokenizers
    from transformers import PreTrainedTokenizerFast

    if (folder / OV_TOKENIZER).is_file():
        return folder / OV_TOKENIZER
    spec = json.loads((folder / "tokenizer.json").read_text())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence":
        kept = [p for p in pre["pretokenizers"] if p.get("type") != "Punctuation"]
        spec["pre_tokenizer"] = kept[0] if len(kept) == 1 else {**pre, "pretokenizers": kept}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(spec))
        (Path(tmp) / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text())
        tokenizer, detokenizer = openvino_tokenizers.convert_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp), with_detokenizer=True)
    original, compiled = PreTrainedTokenizerFast.from_pretrained(folder), ov.compile_model(tokenizer, "CPU")
    for prompt in prompts:
        theirs, ours = original(prompt)["input_ids"], compiled([prompt])["input_ids"][0].tolist()
        if ours != theirs:
            raise ValueError(f"the OpenVINO tokenizer gives {ours} for {prompt!r}, transformers {theirs}")
    ov.save_model(detokenizer, str(folder / "openvino_detokenizer.xml"))
    ov.save_model(tokenizer, str(folder / OV_TOKENIZER))  # last: its presence marks a finished conversion
    return folder / OV_TOKENIZER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("create", help="make the venv (no-op when it works already)")
    e = sub.add_parser("export", help="export a diffusers folder to OpenVINO IR with optimum-intel")
    e.add_argument("source", type=Path)
    e.add_argument("out", type=Path)
    t = sub.add_parser("tokenizer", help="an export's tokenizer folder -> openvino_tokenizer.xml (run with the venv's python)")
    t.add_argument("folder", type=Path)
    t.add_argument("--check", action="append", default=[], help="a prompt whose ids must equal transformers' (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "create":
        print(ENV.create())
    elif args.command == "export":
        print(export(args.source, args.out))
    else:
        print(convert_tokenizer(args.folder, args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
