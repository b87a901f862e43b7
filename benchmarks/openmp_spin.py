#!/usr/bin/env python3
"""OpenMP spin-waiting on a small CPU machine: quiet and beside one competing process.

Times the same CPU training workload (the embedded study's LM shape: a
6-layer, 192-wide Llama, batches of 32 written questions, forward + backward +
AdamW) in fresh processes under several OpenMP settings, first on a quiet
machine, then with one CPU-bound process running beside it, and prints the
wall times and their ratios to torch's default, measured in one run.

> python benchmarks/openmp_spin.py --steps 15

Authors
 * speechbrain-sllm developers 2026
"""

import argparse
import os
import subprocess
import sys
import time

SETTINGS = {
    "default (2 threads, libgomp spins)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=100": {"GOMP_SPINCOUNT": "100"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
WORKLOAD = """
import time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
config = LlamaConfig(vocab_size=400, hidden_size=192, intermediate_size=512,
    num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2)
model = LlamaForCausalLM(config)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 400, (32, 24))
start = time.time()
for _ in range({steps}):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
print(time.time() - start)
"""
COMPETITOR = "while True: pass"


def run_workload(env_overrides, steps):
    """Wall seconds of the workload's training loop in a fresh process."""
    env = {key: value for key, value in os.environ.items() if key not in ALL_KEYS}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", WORKLOAD.format(steps=steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


ALL_KEYS = {key for overrides in SETTINGS.values() for key in overrides}


def main():
    """Measures every setting quiet, then beside one CPU-bound process, and prints ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    rows = {}
    for label in ("quiet", "busy"):
        competitor = None
        if label == "busy":
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR])
            time.sleep(1.0)
        try:
            for name, overrides in SETTINGS.items():
                rows.setdefault(name, {})[label] = run_workload(overrides, args.steps)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
    base = rows["default (2 threads, libgomp spins)"]
    print(f"{args.steps} training steps, {os.cpu_count()} CPUs, wall seconds (ratio to default)")
    print(f"{'setting':<38} {'quiet':>16} {'1 competing process':>22}")
    for name, times in rows.items():
        quiet = f"{times['quiet']:.2f} (x{times['quiet'] / base['quiet']:.2f})"
        busy = f"{times['busy']:.2f} (x{times['busy'] / base['busy']:.2f})"
        print(f"{name:<38} {quiet:>16} {busy:>22}")


if __name__ == "__main__":
    main()
