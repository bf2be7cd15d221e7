"""Gathers the GPU check's parts (bench/gpu_check.py, run by bench/gpu_check.sh) into one JSON
and one Markdown file, with the targets met or missed. Standard library only, so that the
report is written whatever failed in the parts (torch itself included).

    python -m bench.gpu_report --parts DIR --mode gpu|cpu-smoke --json OUT.json --md OUT.md \\
        [--command "..."] [--started EPOCH]

Per part, DIR holds NAME.status (``EXIT_CODE MILLISECONDS TIME_LIMIT_S``, or ``skipped ...``
when the script's time was spent), NAME.log (its output) and NAME.json (what it measured,
written as it went). A part is ok (exit 0), failed (its log's tail is kept), timed out
(exit 124 or 137 from `timeout`), skipped, or not run; its section has whatever it saved.

Targets (issue 19): the IOI step <= 0.1 s and <= 1.5x the HF floor's time; the
Llama-3.1-8B-shaped step runs on one GPU; the CUDA tests and the bandwidth part's checks
against the reference pass. In the CPU smoke the speed and memory targets are not judged
(tiny shapes, interpreted kernels); the tests and the checks are, as they are real there too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PARTS = ("versions", "tests", "ioi_step", "edge_mix_bandwidth", "llama_8b")
TIMED_OUT = (124, 137)  # timeout(1)'s exit codes: the limit, then the kill after it
GB = 1e9


def read_part(parts: Path, name: str) -> dict:
    """The part's section: its saved results and how it ended."""
    status_file, log, data = parts / f"{name}.status", parts / f"{name}.log", parts / f"{name}.json"
    section: dict = {}
    if data.is_file():
        try:
            section.update(json.loads(data.read_text()))
        except ValueError as exc:
            section["results_unreadable"] = f"{name}.json: {exc}"
    if not status_file.is_file():
        section.update(status="not run", error="the script did not reach this part")
        return section
    fields = status_file.read_text().split()
    if fields[0] == "skipped":
        section.update(status="skipped", error="the script's time was spent before this part")
        return section
    rc, ms, limit = int(fields[0]), int(fields[1]), int(fields[2])
    status = section.get("status", "ok") if rc == 0 else "timed out" if rc in TIMED_OUT else "failed"
    section.update(status=status, exit_code=rc, seconds=round(ms / 1000, 1), time_limit_s=limit)
    if status != "ok" and log.is_file():
        section["error"] = log.read_text(errors="replace")[-3000:]
    return section


def _rows(section: dict) -> dict:
    return {r["method"]: r for r in section.get("rows", [])}


def _target(value, bound: float | None, judged: bool, fmt: str = "{:.4g}", why: str | None = None) -> dict:
    if value is None:
        return {"value": None, "target": bound, "met": None, "why": why or "not measured"}
    met = (value <= bound) if (judged and bound is not None) else None
    return {"value": round(value, 4) if isinstance(value, float) else value, "target": bound, "met": met,
            "shown": fmt.format(value)}


def targets(report: dict) -> dict:
    judged = report["mode"] == "gpu"
    ioi, out = _rows(report["ioi_step"]), {}
    ours, floor, orig = ioi.get("ours"), ioi.get("hf_floor"), ioi.get("original")
    out["ioi_step_seconds"] = {**_target(ours and ours["seconds"], 0.1, judged, "{:.4f} s"),
                               "what": "ours, one step at GPT-2 small, batch 32, seq 64, bf16 (paper: ~0.92 s, H100)"}
    out["ioi_time_over_hf_floor"] = {
        **_target(ours["seconds"] / floor["seconds"] if ours and floor else None, 1.5, judged, "{:.2f}x"),
        "what": "ours / (3 forwards + 1 backward of the plain HF model)"}
    out["ioi_speedup_vs_original"] = {
        **_target(orig["seconds"] / ours["seconds"] if ours and orig else None, None, False, "{:.1f}x"),
        "what": "the original algorithm's step / ours (reported; no target on the GPU)"}
    runs = report["llama_8b"].get("runs", [])
    ran = next((r for r in runs if "measured" in r), None)
    if ran:
        m = ran["measured"]
        value = (f"ran: batch {m['batch']} x seq {m['seq']}, checkpoint_layers={m['checkpoint_layers']}, "
                 f"peak {m.get('measured_total_peak_bytes', 0) / GB:.1f} GB of "
                 f"{report['llama_8b'].get('device_gb', 0):.0f} GB, {m.get('step_seconds', 0):.2f} s/step")
        out["llama_8b_on_one_gpu"] = {"value": value, "target": "runs on one GPU", "met": True if judged else None}
    else:
        why = "; ".join(r.get("error", "") for r in runs) or report["llama_8b"].get("error", "not measured")
        out["llama_8b_on_one_gpu"] = {"value": None, "target": "runs on one GPU",
                                      "met": False if judged and runs else None, "why": why[-500:]}
    t = report["tests"]
    if "tests" in t and t.get("status") in ("ok", "failed"):
        bad = t.get("failures", 0) + t.get("errors", 0)
        out["cuda_tests_pass"] = {"value": f"{t.get('passed', 0)} passed, {bad} failed, {t.get('skipped', 0)} "
                                           f"skipped", "target": "all pass", "met": bad == 0 and t.get("passed", 0) > 0}
    else:
        out["cuda_tests_pass"] = {"value": None, "target": "all pass", "met": None,
                                  "why": t.get("reason") or t.get("status")}
    checks = [r for r in report["edge_mix_bandwidth"].get("rows", []) if "check" in r]
    out["edge_mix_matches_reference"] = {
        "value": f"{sum(r['check']['ok'] for r in checks)} of {len(checks)} shapes" if checks else None,
        "target": "all", "met": all(r["check"]["ok"] for r in checks) if checks else None}
    return out


def assemble(parts: Path, mode: str, command: str, started: float | None) -> dict:
    report: dict = {"benchmark": "gpu_check", "mode": mode, "command": command,
                    "what": "bench/gpu_check.sh: versions, the CUDA tests, the IOI step against the original "
                            "algorithm and the HF floor, edge_mix's bandwidth, the Llama-3.1-8B-shaped step "
                            "against the planner (see bench/gpu_check.py)"}
    if mode != "gpu":
        report["note"] = ("CPU smoke: the same pipeline on tiny shapes, the kernels under Triton's interpreter; "
                          "it shows the script works, its figures mean nothing and no target is judged")
    if started is not None:
        report["started"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        report["wall_seconds"] = round(time.time() - started, 1)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    for name in PARTS:
        report[name] = read_part(parts, name)
    report["targets"] = targets(report)
    report["parts"] = {n: {k: report[n].get(k) for k in ("status", "exit_code", "seconds", "time_limit_s")}
                       for n in PARTS}
    return report


def _gb(b) -> str:
    return "-" if b is None else f"{b / GB:.2f}"


def markdown(r: dict) -> str:
    v = r["versions"]
    m = v.get("machine", {})
    out = [f"# GPU check ({r['mode']}), {r.get('started', r['finished'])}", ""]
    if "note" in r:
        out += [f"> {r['note']}", ""]
    out += [f"`{r['command']}`, {r.get('wall_seconds', '?')} s; git {m.get('git_revision', '?')}", "",
            "## Targets", "", "| target | value | met |", "| --- | --- | --- |"]
    for name, t in r["targets"].items():
        met = {True: "met", False: "**missed**", None: "not judged"}[t["met"]]
        out.append(f"| {name} ({t['target']}) | {t.get('shown', t['value']) if t['value'] is not None else t.get('why')} "
                   f"| {met} |")
    out += ["", "## Parts", "", "| part | status | seconds (limit) |", "| --- | --- | --- |"]
    out += [f"| {n} | {p['status']} | {p['seconds']} ({p['time_limit_s']}) |" for n, p in r["parts"].items()]
    out += ["", "## Versions", "",
            f"python {m.get('python')}, torch {m.get('torch')} (CUDA {v.get('torch_cuda')}), triton {m.get('triton')}, "
            f"transformers {m.get('transformers')}, numpy {v.get('numpy')}, pytest {v.get('pytest') or 'not installed'}; "
            f"GPU: {(v.get('gpu') or {}).get('name', 'none')}", "", "```", (v.get("info_text") or "").strip(), "```"]
    t = r["tests"]
    out += ["", "## CUDA tests", "", f"status {t['status']}: {t.get('summary') or t.get('reason') or ''}",
            f"`{t.get('command', '')}`"]
    for f in t.get("failed", []):
        out.append(f"- {f['test']}: {f['message'][:200]}")
    s = r["ioi_step"]
    out += ["", "## IOI step", "", f"status {s['status']}; {json.dumps(s.get('setting', {}))}", "",
            "| method | s/step | peak above start, GB | reps |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {x['method']} | {x['seconds']:.4f} | {_gb(x.get('peak_bytes'))} | {x.get('reps')} |"
            for x in s.get("rows", [])]
    out += [f"| {x['method']} | skipped: {x['reason']} | | |" for x in s.get("skipped", [])]
    if s.get("profile"):
        out += ["", "<details><summary>profile of one step of ours</summary>", "", "```", s["profile"], "```",
                "", "</details>"]
    b = r["edge_mix_bandwidth"]
    peak = b.get("peak", {})
    out += ["", "## edge_mix bandwidth", "", f"status {b['status']}; peak: {peak.get('entry', '-')}; "
            f"device-to-device copy: {b.get('copy_GBps', '-')} GB/s", "",
            "| model | group | R x W | dtype | fwd ms | fwd GB/s (% peak) | bwd ms | bwd GB/s (% peak) "
            "| bwd ms, 1 program/SM | matches |",
            "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for x in b.get("rows", []):
        if "error" in x:
            out.append(f"| {x['model']} | {x['group']} | {x['R']} x {x['W']} | {x['dtype']} | error: {x['error'][:100]} "
                       "| | | | | |")
            continue
        pct = {k: f" ({x[f'{k}_percent_of_peak']} %)" if f"{k}_percent_of_peak" in x else "" for k in ("forward",
                                                                                                  "backward")}
        out.append(f"| {x['model']} | {x['group']} | {x['R']} x {x['W']} | {x['dtype']} | "
                   f"{1e3 * x['forward_seconds']:.3f} | {x['forward_GBps']}{pct['forward']} | "
                   f"{1e3 * x['backward_seconds']:.3f} | {x['backward_GBps']}{pct['backward']} | "
                   f"{1e3 * x['backward_one_program_per_sm']['seconds']:.3f} | "
                   f"{'yes' if x['check']['ok'] else '**no**'} |")
    ll = r["llama_8b"]
    out += ["", "## Llama-3.1-8B-shaped step", "", f"status {ll['status']}; {ll.get('n_params', 0) / 1e9:.2f} B "
            f"parameters, {ll.get('n_writers')} writers, {ll.get('n_edges')} edges, device {ll.get('device_gb')} GB",
            "", "| batch x seq | checkpointed | predicted peak GB | fits | measured peak GB | measured step GB "
            "(predicted) | s/step |", "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    runs = {(x["point"]["batch"], x["point"]["checkpoint_layers"]): x for x in ll.get("runs", [])}
    for p in ll.get("plans", []):
        pt = p["point"]
        run = runs.get((pt["batch"], pt["checkpoint_layers"]), {})
        ms = run.get("measured", {})
        got = (f"{_gb(ms.get('measured_total_peak_bytes'))} | {_gb(ms.get('measured_bytes'))} "
               f"({_gb(ms.get('predicted_step_bytes'))}) | {ms.get('step_seconds', 0):.3f}") if ms else \
            (f"{run['error'][:80]} | | " if "error" in run else "not run | | ")
        out.append(f"| {pt['batch']} x {pt['seq']} | {pt['checkpoint_layers']} | {_gb(p['predicted_peak_bytes'])} | "
                   f"{p['fits']} | {got} |")
    for name in PARTS:
        if r[name].get("error"):
            out += ["", f"### {name}: {r[name]['status']}", "", "```", r[name]["error"][-1500:], "```"]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", type=Path, required=True)
    ap.add_argument("--mode", required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--md", type=Path, required=True)
    ap.add_argument("--command", default="bench/gpu_check.sh")
    ap.add_argument("--started", type=float, default=None, help="the script's start, seconds since the epoch")
    args = ap.parse_args()
    report = assemble(args.parts, args.mode, args.command, args.started)
    args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    try:
        text = markdown(report)
    except Exception as exc:  # a part saved something unexpected: the JSON has it all, say so
        text = f"# GPU check ({args.mode})\n\nThe summary could not be drawn up ({type(exc).__name__}: {exc}); " \
               f"the results are in {args.json.name}.\n"
    args.md.write_text(text)
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
