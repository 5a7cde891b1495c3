"""The summary of a suite's rows: success rates overall, per activation, per expansion factor
rho and per depth, failures by kind, time; as JSON and as Markdown."""

from __future__ import annotations

import numpy as np


def _teacher_widths(r: dict) -> list:
    return list(r.get("widths") or [r["width"]])


def _recovered_widths(r: dict) -> list:
    return list(r.get("recovered_widths") or [r.get("recovered_width")])


def _failures(rows: list[dict]) -> dict:
    """Failures by kind; ``unflagged``: failed rows that are neither marked degraded nor
    without a result (wrong or imprecise results that look like successes); ``modes``: failed
    rows per failure mode (:data:`~expand_and_cluster.suite.diagnose.FAILURE_MODES`, or the
    status of a row without a result; a row can have several modes)."""
    wrong = [r for r in rows if _recovered_widths(r) != _teacher_widths(r)]
    modes: dict[str, int] = {}
    for r in rows:
        if not r["success"]:
            status = r.get("status", "ok")
            for m in r.get("failure_modes") or [status if status != "ok" else "unknown"]:
                modes[m] = modes.get(m, 0) + 1
    return {
        "wrong_width": len(wrong),
        "no_cluster": sum(1 for r in rows if r.get("status") == "no_cluster"),
        "error": sum(1 for r in rows if r.get("status") == "error"),
        "timeout": sum(1 for r in rows if r.get("status") == "timeout"),
        "imprecise": sum(
            1 for r in rows if _recovered_widths(r) == _teacher_widths(r) and not r["success"]
        ),
        "degraded": sum(1 for r in rows if r.get("degraded")),
        "unflagged": sum(
            1
            for r in rows
            if not r["success"] and not r.get("degraded") and r.get("status", "ok") == "ok"
        ),
        "modes": dict(sorted(modes.items(), key=lambda kv: -kv[1])),
    }


def summarise(rows: list[dict]) -> dict:
    """Success rates overall, per activation, per rho and per depth (each depth with its rates
    per activation and its failures); median and total time."""

    def rate(sub, key="success"):
        # Rows written before the width repair (the retrain) existed count as without it.
        return float(np.mean([r.get(key, r["success"]) for r in sub])) if sub else None

    def rates(sub):
        return {
            "problems": len(sub),
            "success_rate": rate(sub),
            "success_rate_1e-6": rate(sub, "success_1e-6"),
            "success_rate_without_repair": rate(sub, "success_without_repair"),
        }

    by_act: dict = {}
    for r in rows:
        by_act.setdefault(r["activation"], []).append(r)
    by_rho: dict = {}
    for r in rows:
        by_rho.setdefault(str(r["rho"]), []).append(r)
    by_depth: dict = {}
    for r in rows:
        by_depth.setdefault(len(_teacher_widths(r)), []).append(r)
    return {
        "problems": len(rows),
        "success_rate": rate(rows),
        "success_rate_1e-6": rate(rows, "success_1e-6"),
        "success_rate_without_repair": rate(rows, "success_without_repair"),
        "success_rate_without_retrain": rate(rows, "success_without_retrain"),
        "retrained": sum(1 for r in rows if r.get("retrained")),
        "retrained_kept": sum(1 for r in rows if r.get("retrain_kept") == "retrained"),
        "per_activation": {a: rates(s) for a, s in sorted(by_act.items())},
        "per_rho": {
            k: {
                **rates(s),
                "per_activation": {
                    a: rates([r for r in s if r["activation"] == a])
                    for a in sorted({r["activation"] for r in s})
                },
            }
            for k, s in sorted(
                by_rho.items(), key=lambda kv: float(kv[0]) if kv[0] != "None" else 0
            )
        },
        "per_depth": {
            str(d): {
                **rates(s),
                "per_activation": {
                    a: rates([r for r in s if r["activation"] == a])
                    for a in sorted({r["activation"] for r in s})
                },
                "failures": _failures(s),
            }
            for d, s in sorted(by_depth.items())
        },
        "failures": _failures(rows),
        "median_seconds": float(np.median([r["seconds"] for r in rows])) if rows else None,
        "total_seconds": float(sum(r["seconds"] for r in rows)),
    }


def summary_markdown(summary: dict) -> str:
    if not summary["problems"]:
        return f"# Suite {summary.get('suite', '')}: no problem has a row yet\n"
    lines = [
        f"# Suite {summary.get('suite', '')}: {summary['problems']} problems",
        "",
        f"Success (exact width, every teacher neuron within 1e-3): "
        f"{summary['success_rate']:.1%}; within 1e-6: {summary['success_rate_1e-6']:.1%}. "
        f"Median time per problem {summary['median_seconds']:.1f} s, total "
        f"{summary['total_seconds']:.0f} s. Without the width repair (the paper's procedure "
        f"alone): {summary['success_rate_without_repair']:.1%}. Retrained (the network far "
        f"worse than its students): {summary.get('retrained', 0)} problem(s), the retrain kept "
        f"in {summary.get('retrained_kept', 0)}; without the retrain: "
        f"{summary.get('success_rate_without_retrain', summary['success_rate']):.1%}.",
        "",
        "| activation | problems | success (1e-3) | success (1e-6) | without repair (1e-3) |",
        "|---|---|---|---|---|",
    ]
    for a, s in summary["per_activation"].items():
        lines.append(
            f"| {a} | {s['problems']} | {s['success_rate']:.0%} | {s['success_rate_1e-6']:.0%} "
            f"| {s['success_rate_without_repair']:.0%} |"
        )
    lines += [
        "",
        "Per expansion factor rho and activation (successes at 1e-3 / problems; without repair "
        "in brackets):",
        "",
        "| rho | all | " + " | ".join(summary["per_activation"]) + " |",
        "|---|---|" + "---|" * len(summary["per_activation"]),
    ]

    def cell(s):
        if not s or not s["problems"]:
            return "-"
        n = s["problems"]
        ok = round(s["success_rate"] * n)
        raw = round(s["success_rate_without_repair"] * n)
        return f"{ok}/{n} ({raw})"

    for k, s in summary["per_rho"].items():
        per = s.get("per_activation", {})
        lines.append(
            f"| {k} | {cell(s)} | "
            + " | ".join(cell(per.get(a)) for a in summary["per_activation"])
            + " |"
        )
    depths = summary.get("per_depth", {})
    if len(depths) > 1 or any(d != "1" for d in depths):
        lines += [
            "",
            "Per depth (hidden layers) and activation (successes at 1e-3 / problems; without "
            "repair in brackets), and failures (wrong width / imprecise / marked degraded / "
            "unflagged):",
            "",
            "| depth | all | " + " | ".join(summary["per_activation"]) + " | failures |",
            "|---|---|" + "---|" * (len(summary["per_activation"]) + 1),
        ]
        for d, s in depths.items():
            per, f = s.get("per_activation", {}), s["failures"]
            lines.append(
                f"| {d} | {cell(s)} | "
                + " | ".join(cell(per.get(a)) for a in summary["per_activation"])
                + f" | {f['wrong_width']} / {f['imprecise']} / {f['degraded']} / "
                f"{f['unflagged']} |"
            )
    f = summary["failures"]
    lines += [
        "",
        f"Failures: wrong width {f['wrong_width']} (of which no cluster "
        f"{f['no_cluster']}), exact width but a neuron further than 1e-3 "
        f"{f['imprecise']}; marked degraded {f.get('degraded', 0)}, failed without being "
        f"marked {f.get('unflagged', 0)}; errors {f.get('error', 0)}, timeouts "
        f"{f.get('timeout', 0)}.",
        "",
    ]
    if f.get("modes"):
        lines += [
            "Failure modes (failed rows with each; a row can have several): "
            + ", ".join(f"{m} {n}" for m, n in f["modes"].items())
            + ".",
            "",
        ]
    return "\n".join(lines)
