"""``attnc plan``: the distribution plan of a pattern at a length and world size (runs nothing).

PATTERN is a catalogue name with ``--param value`` options or a DSL expression, as for every
``attnc`` command. Example: ``attnc plan sliding_window --window 256 --seq-len 1048576 --world-size 8``
(or ``attnc plan "sliding_window(256)" ...``);
``attnc plan causal -L 1048576 -P 8 --sharding auto`` also compares the shardings' load balance.
"""

from __future__ import annotations

import argparse
import json
import time

from .common import parse_command, register_pattern_command

_HELP = "distributed attention plan: shards needed, bytes, blocks per rank"


def _cmd_plan(argv: list[str]) -> int:
    from ..distributed.plan import format_plan, plan_attention

    [spec], args = parse_command("plan", _HELP, argv, _options)
    pattern = spec.pattern
    t0 = time.perf_counter()
    plan = plan_attention(pattern, args.seq_len, args.world_size, args.mode, batch=args.batch, heads=args.heads,
                          head_dim=args.head_dim, elem_bytes=args.elem_bytes, block=args.layout_block or spec.block,
                          gather=args.gather, sharding=args.sharding, stripes=args.stripes,
                          dense_rows={"auto": None, "on": True, "off": False}[args.dense_rows])
    seconds = time.perf_counter() - t0  # the plan alone: interpreter start-up and imports excluded
    if args.json:
        print(json.dumps({"pattern": repr(pattern), "mode": plan.mode, "seq_len": plan.seq_len,
                          "world_size": plan.world_size, "chunk_bounds": list(plan.sharding.chunk_bounds),
                          "sharding": plan.sharding.kind, "imbalance": plan.imbalance, "ring_steps": plan.steps,
                          "total_bytes": plan.total_bytes, "dense_total_bytes": plan.dense_total_bytes,
                          "total_bytes_fwd_bwd": plan.total_bytes_fwd_bwd,
                          "dense_rows": [[list(x) for x in rows] for rows in plan.dense_rows],
                          "ranks": [r.__dict__ | {"needs": list(r.needs), "segments": [list(x) for x in r.segments]}
                                    for r in plan.ranks],
                          "alternatives": [{"sharding": a.kind, "blocks": list(a.blocks), "imbalance": a.imbalance,
                                            "total_bytes": a.total_bytes} for a in plan.alternatives]},
                         indent=1))
    else:
        print(format_plan(plan))
        print(f"planned in {seconds:.3f} s (process start-up and imports excluded)")
    return 0


def _options(p: argparse.ArgumentParser, pattern_names: set[str]) -> None:
    """The options of ``attnc plan`` (a pattern parameter of the same name gets ``--pattern-`` first)."""
    p.add_argument("--seq-len", "-L", type=int, required=True, help="sequence length L")
    p.add_argument("--world-size", "-P", type=int, required=True, help="number of ranks")
    p.add_argument("--mode", choices=("ring", "heads"), default="ring", help="sequence-parallel ring or head-parallel")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--elem-bytes", type=int, default=4, help="bytes per element (4: fp32, 2: bf16)")
    names = ["--layout-block"] + ([] if "block" in pattern_names else ["--block"])
    p.add_argument(*names, dest="layout_block", type=int, default=None,
                   help="layout block size used to find shard needs (default: the pattern's block parameter)")
    p.add_argument("--sharding", choices=("contiguous", "zigzag", "striped", "auto"), default="contiguous",
                   help="ring mode: how the sequence is split (auto: best load balance, then fewest bytes)")
    p.add_argument("--stripes", type=int, default=4, help="chunks per rank of the striped sharding")
    p.add_argument("--dense-rows", choices=("auto", "on", "off"), default="auto",
                   help="ring mode: send query rows that attend to most keys (global tokens) to the key owners "
                        "(auto: when it moves fewer bytes)")
    p.add_argument("--gather", action="store_true", help="heads mode: all-gather the output")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers) -> None:
    """Add ``plan`` to the ``attnc`` parser."""
    register_pattern_command(subparsers, "plan", _HELP, _cmd_plan)
