"""MiniSpokenQA's report: the paper-style table and the study's outputs.

Authors
 * speechbrain-sllm developers 2026
"""

import torch

import speechbrain_sllm
from speechbrain_sllm.study import print_summary, write_study_outputs


def results_table(base, runs):
    """The paper-style table as markdown."""
    lines = [
        "| Method | T2T acc % | S2T acc % | text PPL | importance JS vs base | peak layer "
        "| top-3% IoU vs base |",
        "|---|---|---|---|---|---|---|",
        f"| no fine-tuning | {base['t2t']:.1f} | - | {base['text_ppl']:.3f} | 0 "
        f"| {base['peak']} | 1 |",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {run['t2t']:.1f} | {run['s2t']:.1f} | {run['text_ppl']:.3f} | "
            f"{run['shift']['js']:.4f} | {run['shift']['peak_after']} | {run['top3_iou']:.3f} |"
        )
    return "\n".join(lines)


def report(hparams, base, runs, profiles, clock):
    """Stage 6: table, results.json, timings.json, plots; returns the results."""
    folder, table = hparams["output_folder"], results_table(base, runs)
    threads = torch.get_num_threads()
    results = {"base": base, "strategies": runs, "table": table, "torch_threads": threads}
    timings = {"total": clock.total(), "stages": clock.seconds, "torch_threads": threads}
    timings["openmp_waiting"] = speechbrain_sllm.OPENMP_WAITING
    write_study_outputs(folder, results, timings, profiles, table)
    print_summary(table, base["zeroing"], "3% of the base LLM's parameters", results, timings)
    print(
        f"Results: {folder}/results.json, "
        f"{folder}/results.md; plots: {folder}/plots/; importance profiles: "
        f"{folder}/importance/; predictions and train logs: {folder}/finetune/<strategy>/"
    )
    return results
