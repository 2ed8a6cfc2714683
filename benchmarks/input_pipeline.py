r"""CPU and wall time per training batch of a config's input pipeline alone (no model).

    python benchmarks/input_pipeline.py --config=configs/digits.py [--batches=440] [--out=FILE]

Builds the training stream as `python -m farmer_jax.main` does (`input_pipeline.train_iterator`,
this process's share of config.train.batch_size, from step 0), takes one batch (the pipeline's
set-up, and the tfds preparation of an embedded data set on first use), then times `--batches`
more: this process's CPU time (every thread, tf.data's included) and wall time per batch. Small
data sets cross many epochs, and each epoch builds its own tf.data pipeline (its own file order
and shuffle), so the figure includes that. On 2 cores the pipeline's CPU time is taken from XLA's:
compare it with the train step's (benchmarks/train_throughput.py).

Progress goes to stderr; the last line of stdout is one JSON object.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from farmer_jax import cli, input_pipeline, metrics  # noqa: E402


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  cli.add_config_arguments(parser)
  parser.add_argument("--batches", type=int, default=440)
  parser.add_argument("--out")
  args = parser.parse_args(argv)
  if args.batches < 1:
    parser.error(f"--batches ({args.batches}) must be >= 1")
  config = cli.load_config(args.config, args.set)
  t0 = time.perf_counter()
  data = input_pipeline.train_iterator(config.data, global_batch_size=config.train.batch_size,
                                       seed=config.seed)
  first = next(data)
  first_s = time.perf_counter() - t0
  print(f"{config.data.name}: first batch {tuple(first['image'].shape)} in {first_s:.1f} s; "
        f"timing {args.batches} more", file=sys.stderr, flush=True)
  cpu0, wall0 = time.process_time(), time.perf_counter()
  for _ in range(args.batches):
    batch = next(data)
  cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
  b = batch["image"].shape[0]
  num_train = input_pipeline.num_examples(config.data, config.data.train_split)
  result = {
      "dataset": config.data.name, "batch_shape": list(batch["image"].shape),
      "train_examples": num_train, "batches": args.batches,
      "epochs_timed": round(args.batches * b / num_train, 2),
      "first_batch_s": round(first_s, 2),
      "cpu_ms_per_batch": round(1e3 * cpu / args.batches, 2),
      "wall_ms_per_batch": round(1e3 * wall / args.batches, 2),
      "batches_per_s": round(args.batches / wall, 1),
  }
  metrics.print_json_line(result, args.out)
  return result


if __name__ == "__main__":
  main()
