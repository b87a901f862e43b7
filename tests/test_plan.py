"""The memory planner against memory measured on the CPU, and its command line."""

import dataclasses
import json
import subprocess
import sys

import pytest
from transformers import LlamaConfig

from speechbrain_sllm.memory_plan import count_parameters, llm_config, plan_memory
from speechbrain_sllm.plan import main

CONFIG = dict(
    vocab_size=16000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
MEASURE = """
import json, resource, sys, torch
import pytest
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(**json.loads(sys.argv[1]))
ids = torch.randint(0, config.vocab_size, (1, 32))
def rss():  # resident now (not the high-water mark, which earlier allocations can raise)
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()
warm = LlamaForCausalLM(LlamaConfig(**dict(json.loads(sys.argv[1]), num_hidden_layers=1,
    vocab_size=64, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2)))
warm(input_ids=ids % 64, labels=ids % 64).loss.backward()  # library warm-up, not counted
del warm
before = rss()
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(2):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
print(rss() - before)
"""


def test_planned_bytes_match_the_measured_peak_of_a_cpu_training_step():
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(CONFIG)],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = int(out.stdout.strip().splitlines()[-1])
    plan = plan_memory(
        LlamaConfig(**CONFIG), "full_ft", dtype="float32", seq_len=32, checkpointing=False
    )
    assert abs(plan.total - measured) / measured < 0.10, (plan, measured)


def test_sharding_divides_weights_gradients_and_optimizer_but_not_activations():
    ddp = plan_memory("llama-3.1-8b", "full_ft", world_size=8, parallelism="ddp")
    fsdp = plan_memory("llama-3.1-8b", "full_ft", world_size=8, parallelism="fsdp")
    for part in ("weights", "gradients", "optimizer"):
        assert getattr(fsdp, part) == getattr(ddp, part) // 8
    assert fsdp.activations == ddp.activations
    lora = plan_memory("llama-3.1-8b", "lora", lora_rank=16)
    assert lora.gradients < ddp.gradients / 100 and lora.weights > ddp.weights


def test_the_command_line_prints_the_plan_of_its_arguments(capsys):
    main(["--llm", "llama-3.2-1b", "--strategy", "lora", "--world-size", "8"])
    printed = dict(
        part.rsplit(" ", 1) for part in capsys.readouterr().out.split(" (GiB")[0].split(", ")
    )
    plan = plan_memory("llama-3.2-1b", "lora", world_size=8)
    for part, value in dataclasses.asdict(plan).items():
        assert float(printed[part]) == pytest.approx(value / 2**30, abs=0.005), part
    assert float(printed["total"]) == pytest.approx(plan.total / 2**30, abs=0.005)


def test_mitigations_add_what_they_keep_and_nothing_else():
    plain = plan_memory("llama-3.2-1b", "full_ft", batch_size=2, seq_len=256)
    total, trainable, _ = count_parameters(llm_config("llama-3.2-1b"), "full_ft")
    anchored = plan_memory("llama-3.2-1b", "full_ft+anchor", batch_size=2, seq_len=256)
    assert anchored.mitigations == 2 * trainable * 2  # base values + weights, bf16
    replay = plan_memory("llama-3.2-1b", "full_ft+replay+interpolation", batch_size=2, seq_len=256)
    assert replay.mitigations == plain.activations + 2 * total * 2
    for part in ("weights", "gradients", "optimizer", "activations"):
        assert getattr(anchored, part) == getattr(plain, part) == getattr(replay, part)
    assert anchored.total == plain.total + anchored.mitigations
    with pytest.raises(ValueError, match="mitigations \\['ewc'\\] unknown"):
        plan_memory("llama-3.2-1b", "full_ft+ewc")
