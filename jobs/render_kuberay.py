"""Embed the Serve configs in deploy/ into the KubeRay RayServices that run them, so there is one copy.

    python -m jobs.render_kuberay            # rewrite each RayService's serveConfigV2 from its Serve config
    python -m jobs.render_kuberay --check    # exit 1, naming the files, when one is stale (what the tests check)

A RayService carries its Serve config inline (`serveConfigV2: |`) and cannot read a file, so the file in
deploy/ is the source and the block in deploy/kuberay/ is its copy, rewritten here: the Serve config's text
from its first setting on (its header comments stay behind), indented under serveConfigV2. Everything else in
the manifest (comments included) is left as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY = "serveConfigV2: |"
# RayService manifest -> the Serve config it runs
EMBEDDED = {
    "deploy/kuberay/rayservice-rewards.yaml": "deploy/rewards.yaml",
    "deploy/kuberay/rayservice-generator.yaml": "deploy/serve_generator_cluster.yaml",
}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def serve_body(serve_text: str) -> list[str]:
    """The Serve config's lines from its first setting on (leading comments and blank lines dropped)."""
    lines = serve_text.rstrip("\n").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    return lines[start:]


def embed(manifest_text: str, serve_text: str) -> str:
    """`manifest_text` with the block under its one `serveConfigV2: |` replaced by the Serve config."""
    lines = manifest_text.rstrip("\n").splitlines()
    keys = [i for i, line in enumerate(lines) if line.strip() == KEY]
    if len(keys) != 1:
        raise ValueError(f"expected one '{KEY}' line, found {len(keys)}")
    i = keys[0]
    end = i + 1
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > _indent(lines[i])):
        end += 1
    pad = " " * (_indent(lines[i]) + 2)
    body = [pad + line if line.strip() else "" for line in serve_body(serve_text)]
    return "\n".join(lines[:i + 1] + body + lines[end:]) + "\n"


def stale(root: Path = ROOT) -> list[str]:
    """The RayService manifests whose serveConfigV2 is not their Serve config's current text."""
    return [m for m, s in EMBEDDED.items()
            if embed((root / m).read_text(), (root / s).read_text()) != (root / m).read_text()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.render_kuberay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a manifest is stale")
    args = ap.parse_args(argv)
    old = stale()
    if args.check:
        for m in old:
            print(f"{m}: serveConfigV2 differs from {EMBEDDED[m]}; run python -m jobs.render_kuberay")
        return 1 if old else 0
    for m in old:
        (ROOT / m).write_text(embed((ROOT / m).read_text(), (ROOT / EMBEDDED[m]).read_text()))
        print(f"{m}: serveConfigV2 <- {EMBEDDED[m]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
