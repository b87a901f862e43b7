"""VoiceAssistant-400K preparation from parquet: rows per second and peak memory against size.

Writes VoiceAssistant-400K's schema (question, question_audio {bytes, path}, answer,
split_name, index_in_split, round, answer_snac) with real eSpeak NG speech (64 distinct
clips, each row its own bytes) into shards of ``--rows_per_shard`` rows, then prepares
a small and a large set, each in a fresh process, and prints rows per second and the
peak resident memory of each; the ratio of the peaks shows whether memory grows with
the number of rows (it must not).

> python benchmarks/voiceassistant_parquet.py --rows 20000 --small 5000

Authors
 * speechbrain-sllm developers 2026
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "recipes", "VoiceAssistant"))


def write_shards(folder, rows, rows_per_shard):
    """``rows`` rows of VoiceAssistant-400K's schema in parquet shards under ``folder``."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile

    from speechbrain_sllm.data.tts import EspeakTTS

    tts = EspeakTTS()
    clips = []
    for index in range(64):
        buffer = io.BytesIO()
        wav = tts.synthesize(f"question number {index}, what is the answer?", rate=180)
        soundfile.write(buffer, wav.numpy(), 16000, format="WAV", subtype="PCM_16")
        clips.append(buffer.getvalue())
    os.makedirs(folder, exist_ok=True)
    shards = (rows + rows_per_shard - 1) // rows_per_shard
    for shard in range(shards):
        start = shard * rows_per_shard
        part = [
            {
                "split_name": "qa",
                "index_in_split": index,
                "round": 0,
                "question": f"question number {index}, what is the answer?",
                "question_audio": {"bytes": bytes(clips[index % 64]), "path": f"{index}.wav"},
                "answer": "An answer of a few sentences, as VoiceAssistant's responses are. " * 4,
                "answer_snac": "",
            }
            for index in range(start, min(rows, start + rows_per_shard))
        ]
        name = f"train-{shard:05d}-of-{shards:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(part), os.path.join(folder, name))


def prepare(source, save_folder):
    """Runs the recipe's preparation; prints ``{"seconds", "peak_rss_mb"}`` as JSON."""
    import voiceassistant_prepare

    evaluation = os.path.join(save_folder, "eval.jsonl")
    os.makedirs(save_folder, exist_ok=True)
    with open(evaluation, "w") as handle:
        handle.write("")
    start = time.perf_counter()
    voiceassistant_prepare.prepare_parquet_training(
        source, save_folder, save_folder, valid_fraction=0.01, seed=0
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def measure(rows, rows_per_shard, work):
    """Rows per second and peak RSS of preparing ``rows`` rows in a fresh process."""
    source = os.path.join(work, f"data_{rows}")
    write_shards(source, rows, rows_per_shard)
    save = os.path.join(work, f"prepared_{rows}")
    command = [sys.executable, __file__, "--prepare", source, save]
    env = dict(os.environ, TQDM_DISABLE="1")
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows_per_second"] = rows / result["seconds"]
    return result


def main():
    """Prints the two measurements and their ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--rows_per_shard", type=int, default=2500)
    parser.add_argument("--prepare", nargs=2, metavar=("SOURCE", "SAVE"))
    args = parser.parse_args()
    if args.prepare:
        prepare(*args.prepare)
        return
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as work:
        small = measure(args.small, args.rows_per_shard, work)
        large = measure(args.rows, args.rows_per_shard, work)
    for rows, result in ((args.small, small), (args.rows, large)):
        print(
            f"{rows:>7} rows: {result['rows_per_second']:.0f} rows/s, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB"
        )
    print(
        f"x{args.rows / args.small:.1f} rows: peak RSS x{large['peak_rss_mb'] / small['peak_rss_mb']:.3f}, "
        f"throughput x{large['rows_per_second'] / small['rows_per_second']:.3f}"
    )


if __name__ == "__main__":
    main()
