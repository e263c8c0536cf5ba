"""The static model's side of gpu-check's ``fit`` stage, which needs no GPU: computed beforehand, reused there.

The ``fit`` stage sets the static model's time of every swept decode candidate (``bench.tune --predict``)
and of whole decode steps (``bench.static``) beside what the GPU measures. Both are read from compiled sm_90
code, which depends on the tree's sources and the Triton version alone; compiled from a cold Triton cache
they take about 90 s at LLaVA-7B shapes (the 2-core CPU machine), a large part of a lent GPU's short lease.
So ``make fit-inputs`` computes them on any machine with the GPU image's Triton (installed beside the
project's), into ``bench/out/fit-inputs`` with a ``meta.json`` naming the sources' digest, the Triton
version and the model; carried to the GPU machine with the tree, the stage copies them where all three
match the machine's, and compiles them itself otherwise.

    python -m bench.fit_inputs OUT_DIR [--model llava-7b]                 # compute
    python -m bench.fit_inputs OUT_DIR --reuse DIR [--model llava-7b]     # DIR's where they match, else compute
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("predicted.json", "static.json")
DEFAULT_DIR = Path("bench") / "out" / "fit-inputs"


def source_files(root: Path = ROOT) -> list[Path]:
    """What the compiled code and the model's figures are made from: the library (its kernels, launchers,
    runtime and committed tables) and the bench modules that launch and read them."""
    library = [p for p in (root / "adallava_kernels").rglob("*") if p.suffix in (".py", ".json")]
    return sorted(library + list((root / "bench").glob("*.py")), key=lambda p: p.relative_to(root).as_posix())


def sources_digest(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    for path in source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def meta(model: str) -> dict:
    import triton

    return {"sources": sources_digest(), "triton": triton.__version__, "model": model}


def reusable(folder: Path, ours: dict) -> str | None:
    """Why ``folder``'s inputs cannot be reused where :func:`meta` is ``ours`` (None: they can)."""
    try:
        theirs = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return f"no readable {folder / 'meta.json'}"
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        return f"{folder} lacks {missing}"
    differ = [f"{key} {theirs.get(key)!r} here {value!r}" for key, value in ours.items() if theirs.get(key) != value]
    return f"{folder} was computed for other inputs: {'; '.join(differ)}" if differ else None


def compute(out: Path, model: str) -> None:
    from . import static, tune

    out.mkdir(parents=True, exist_ok=True)
    tune.main(["--predict", str(out / "predicted.json"), "--model", model])
    static.main([str(out / "static.json"), "--model", model])
    (out / "meta.json").write_text(json.dumps(meta(model), indent=1))


def main(argv: list[str] | None = None) -> int:
    from adallava_kernels.cli import ArgumentParser
    from adallava_kernels.shape import PRESETS

    parser = ArgumentParser(prog="python -m bench.fit_inputs", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder to write predicted.json, static.json and meta.json to")
    parser.add_argument("--model", choices=sorted(PRESETS), default="llava-7b", help="the shape preset")
    parser.add_argument("--reuse", type=Path, default=None, metavar="DIR",
                        help="copy DIR's files where they were computed for these sources, Triton and model")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels must be compiled, so run it with TRITON_INTERPRET unset")
    if args.reuse is not None:
        ours = meta(args.model)
        why = reusable(args.reuse, ours)
        if why is None:
            args.out.mkdir(parents=True, exist_ok=True)
            for name in (*FILES, "meta.json"):
                shutil.copyfile(args.reuse / name, args.out / name)
            print(f"bench.fit_inputs: reused {args.reuse} (sources {ours['sources'][:12]}, triton {ours['triton']}, "
                  f"{args.model})")
            return 0
        print(f"bench.fit_inputs: compiling here: {why}")
    compute(args.out, args.model)
    print(f"bench.fit_inputs: wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
