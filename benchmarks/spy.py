"""Summarize py-spy `--format raw` profiles (collapsed stacks): the top frames by
inclusive and by self share of the samples, per thread when recorded with --threads.

    .venv/bin/python -m benchmarks.spy PROFILE.txt [--top 25] [--match TEXT]
"""

import argparse
import re
from collections import Counter
from pathlib import Path

WAITS = (
    "Condition.wait",
    "Event.wait",
    "Queue.get",
    "select (",
    "sleep",
    "Layout.sync",
    "_worker (thread.py)",
    "EpollSelector.select",
    "Runner.run (runners.py)",
)
"""Leaf frames that wait rather than compute (py-spy's idle detection misses some)."""
_LOC = re.compile(r" \((?P<file>[^()]*?):\d+\)$")


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:12)` -> `func (file.py)`: lines merged, files kept."""
    m = _LOC.search(frame)
    if not m:
        return frame.strip()
    return f"{frame[: m.start()].strip()} ({Path(m.group('file')).name})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(
    path: Path, *, top: int = 25, match: str | None = None, cpu: bool = False
) -> list[str]:
    stacks = load(path)
    if cpu:
        stacks = [(f, c) for f, c in stacks if not any(w in frame_name(f[-1]) for w in WAITS)]
    total = sum(c for _, c in stacks) or 1
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        if match and not any(match in f for f in frames):
            continue
        names = [frame_name(f) for f in frames]
        thread = next((n for n in names if n.startswith("thread ")), None)
        if thread:
            threads[thread] += count
        for name in set(names):
            inclusive[name] += count
        own[names[-1]] += count
    lines = [f"{path}: {total} samples"]
    if threads:
        lines.append("by thread:")
        lines += [f"  {100 * c / total:5.1f}%  {n}" for n, c in threads.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * c / total:5.1f}%  {n}" for n, c in inclusive.most_common(top)]
    lines.append("self:")
    lines += [f"  {100 * c / total:5.1f}%  {n}" for n, c in own.most_common(top)]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu", action="store_true", help="drop stacks that end waiting")
    ap.add_argument("--match", help="only stacks with a frame containing this text")
    args = ap.parse_args()
    for path in args.paths:
        print("\n".join(summarize(path, top=args.top, match=args.match, cpu=args.cpu)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
