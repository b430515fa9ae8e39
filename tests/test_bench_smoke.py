"""The trainer-vs-TRL benchmark compares like with like: TRL's GRPOTrainer, configured by the benchmark, computes
the same GSPO loss and gradient as ours on a real rollout, and does the same work per rollout step."""

import threading

import pytest

pytest.importorskip("trl")
SMALL = ["gspo.prompts_per_step=2", "gspo.group_size=4", "gspo.max_new_tokens=4"]


@pytest.fixture(scope="module")
def bench(load_bench):
    return load_bench("trainer_vs_trl")


def test_trl_config_does_the_same_work(bench, tmp_path):
    cfg = bench.bench_config(3, 1)
    args = bench.trl_args(cfg, str(tmp_path), cfg.train.steps)
    g = cfg.gspo
    # one generation of the whole rollout batch per num_minibatches optimizer updates, each on an equal slice
    assert args.generation_batch_size == g.prompts_per_step * g.group_size
    assert args.steps_per_generation * args.num_iterations == g.num_minibatches
    assert args.gradient_accumulation_steps == 1
    assert args.per_device_train_batch_size * g.num_minibatches == args.generation_batch_size
    assert args.max_steps == cfg.train.steps * g.num_minibatches
    assert (args.num_generations, args.max_completion_length, args.temperature, args.top_p, args.top_k) == (
        g.group_size,
        g.max_new_tokens,
        g.temperature,
        g.top_p,
        0,
    )
    assert (args.loss_type, args.importance_sampling_level, args.beta) == ("grpo", "sequence", 0.0)
    assert (args.epsilon, args.epsilon_high) == g.clip_range()
    assert (args.optim, args.learning_rate, args.max_grad_norm) == ("adamw_torch", cfg.optim.lr, cfg.optim.grad_clip)
    assert not args.gradient_checkpointing and not cfg.model.gradient_checkpointing
    assert (args.use_cpu, args.bf16, args.fp16) == (True, False, False)


def test_loss_agrees_with_trl_on_a_rollout(bench, tmp_path):
    cfg = bench.bench_config(1, 1, SMALL)
    model_dir = bench.save_tiny(tmp_path / "tiny", seed=0)
    c = bench.check_loss(cfg, model_dir, bench.prepare_splits(cfg).train, n_prompts=2, noise=5e-3)
    assert 0 < c["clip_frac"] < 1  # both branches of the clipped objective are in play
    assert bench.agree(c), c


def test_turns_alternate_steps_and_let_the_last_one_finish(bench):
    turns = bench.Turns(["a", "b"])
    log = []

    def worker(name, steps):
        turns.begin(name)
        for _ in range(steps):
            log.append(name)  # only the thread holding the turn runs, so the log shows the order
            turns.step_done(name)
        turns.finish(name)

    threads = [threading.Thread(target=worker, args=args) for args in (("a", 2), ("b", 4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert log == ["a", "b", "a", "b", "b", "b"]
    assert [len(turns.secs[n]) for n in "ab"] == [2, 4]
