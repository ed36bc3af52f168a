"""DPO (qwen2_mlx.dpo): losses against TRL's formulas in torch, the reference model from disabled
adapters, reply-only log-probs, learning a preference, precomputed references, resume, CLI.

The torch reference below re-derives TRL's `DPOTrainer` (huggingface/trl,
trl/trainer/dpo_trainer.py): log-probs by `log_softmax` + `gather` on the shifted logits with
the completion mask zeroing non-reply targets, summed per sequence; then its `dpo_loss`
(sigmoid with label smoothing as in TRL <= 0.28, hinge, and IPO on per-token-averaged
log-ratios as in TRL >= 0.29) and rewards ``beta * (policy - reference)``.
"""

from __future__ import annotations

import json
import random
import runpy
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qwen2_mlx import load
from qwen2_mlx.cli.main import cli
from qwen2_mlx.dpo import (
    DPOConfig,
    dpo_loss,
    evaluate_dpo,
    precompute_reference_logps,
    reference_logps,
    sequence_logps,
    train_dpo,
)
from qwen2_mlx.dpo.data import PreferenceDataset, encode_pair, make_preference_batch
from qwen2_mlx.dpo.loss import METRICS, metric_sums, metrics_dict
from qwen2_mlx.loader import load_model
from qwen2_mlx.lora import LoRAConfig, apply_lora, lora_layers
from qwen2_mlx.lora.adapters import adapter_weights
from qwen2_mlx.tokenizer import Qwen2Tokenizer
from qwen2_mlx.train import TrainingConfig
from qwen2_mlx.train.data import BatchSchedule, Example, make_batch

from conftest import load_torch_model
from lora_tasks import LETTERS, last_letter_items, randomize_adapters

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo"
LOSS_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.3, 0.2), ("ipo", 0.5, 0.0),
              ("hinge", 0.2, 0.0)]
LOSS_IDS = ["sigmoid", "cdpo", "ipo", "hinge"]


# --------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny(checkpoint_factory):
    return checkpoint_factory()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return Qwen2Tokenizer.from_pretrained(tiny)


class FixedLogits:
    """A stand-in model whose logits are a fixed array (for `trained_logits`' plain path)."""

    def __init__(self, logits: mx.array):
        self.logits = logits

    def __call__(self, inputs: mx.array) -> mx.array:
        assert inputs.shape == self.logits.shape[:2]
        return self.logits


def random_sequences(pairs: int, seed: int = 0, vocab: int = 50):
    """2*pairs sequences (chosen rows, then rejected) of unequal lengths with a prompt part
    and a scored reply part each."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(2 * pairs):
        prompt, reply = int(rng.integers(2, 6)), int(rng.integers(1, 6))
        tokens = [int(t) for t in rng.integers(0, vocab, prompt + reply + 1)]
        examples.append(Example(tokens, [False] * prompt + [True] * reply + [False]))
    return examples


def torch_trl_loss(policy_logits, ref_logits, batch, beta, loss_type, label_smoothing):
    """TRL's computation in torch, from the shifted logits: (losses, chosen, rejected rewards,
    policy logps)."""
    import torch
    import torch.nn.functional as F

    labels = torch.tensor(np.array(batch.targets)).long()
    mask = torch.tensor(np.array(batch.mask))

    def logps(logits):
        per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
        return (per_token * mask).sum(1)

    policy, ref = logps(policy_logits), logps(ref_logits)
    n = policy.shape[0] // 2
    chosen_ratio, rejected_ratio = policy[:n] - ref[:n], policy[n:] - ref[n:]
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * h) * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        lengths = mask.sum(1)
        ipo_h = chosen_ratio / lengths[:n] - rejected_ratio / lengths[n:]
        losses = (ipo_h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), policy


def ours(policy_logits, ref_logits, batch, beta, loss_type, label_smoothing):
    policy = sequence_logps(FixedLogits(policy_logits), batch)
    ref = sequence_logps(FixedLogits(ref_logits), batch)
    lengths = batch.mask.sum(axis=1)
    n = policy.shape[0] // 2
    pair = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, chosen_lengths=lengths[:n],
                    rejected_lengths=lengths[n:])
    return pair, policy


def close(ours_value, torch_value, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.array(ours_value), torch_value.detach().numpy(), rtol=rtol,
                               atol=atol)


# ----------------------------------------------------------------- loss and log-probs exact


@pytest.mark.parametrize("loss_type, beta, label_smoothing", LOSS_CASES, ids=LOSS_IDS)
def test_loss_rewards_and_gradient_equal_trl_in_torch(loss_type, beta, label_smoothing):
    """Fixed logits for 6 pairs (12 sequences of different lengths, right-padded): per-pair
    losses, rewards, the step metrics and the gradient of the mean loss with respect to the
    policy logits equal TRL's formulas written in torch, to float32 precision."""
    import torch

    batch = make_batch(random_sequences(6))
    rng = np.random.default_rng(1)
    shape = (*batch.inputs.shape, 50)
    policy_np = (3 * rng.normal(size=shape)).astype(np.float32)
    ref_np = (policy_np + rng.normal(size=shape)).astype(np.float32)

    pair, policy = ours(mx.array(policy_np), mx.array(ref_np), batch, beta, loss_type,
                        label_smoothing)
    policy_t = torch.tensor(policy_np, requires_grad=True)
    losses, chosen, rejected, policy_ref = torch_trl_loss(policy_t, torch.tensor(ref_np), batch,
                                                          beta, loss_type, label_smoothing)
    close(policy, policy_ref)
    close(pair.losses, losses)
    close(pair.chosen_rewards, chosen)
    close(pair.rejected_rewards, rejected)
    assert np.array(pair.losses).std() > 0.05  # the pairs really differ

    # TRL's logged metrics: batch means of the per-pair values.
    got = metrics_dict(metric_sums(pair, policy[:6], policy[6:]), 6)
    expected = {"loss": losses.mean(), "rewards/chosen": chosen.mean(),
                "rewards/rejected": rejected.mean(),
                "rewards/margins": (chosen - rejected).mean(),
                "rewards/accuracies": (chosen > rejected).float().mean(),
                "logps/chosen": policy_ref[:6].mean(), "logps/rejected": policy_ref[6:].mean()}
    assert set(got) == set(METRICS)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-6), name
    assert 0 < got["rewards/accuracies"] < 1  # per pair, not a comparison of batch means

    def mean_loss(logits):
        return ours(logits, mx.array(ref_np), batch, beta, loss_type,
                    label_smoothing)[0].losses.mean()

    grad = mx.grad(mean_loss)(mx.array(policy_np))
    losses.mean().backward()
    scale = policy_t.grad.abs().max().item()
    assert scale > 0
    close(grad, policy_t.grad, rtol=1e-4, atol=1e-6 * scale)


def test_accuracy_is_per_pair_not_from_batch_means():
    """Two pairs: one strongly right, one slightly wrong. Batch-mean rewards (mlx-lm-lora)
    would call this 100% accurate; the per-pair accuracy is 50%."""
    zero = mx.zeros(2)
    pair = dpo_loss(mx.array([5.0, 0.0]), mx.array([0.0, 0.1]), zero, zero, beta=1.0)
    metrics = metrics_dict(metric_sums(pair, zero, zero), 2)
    assert metrics["rewards/accuracies"] == 0.5
    assert metrics["rewards/margins"] == pytest.approx((5.0 - 0.1) / 2)


def test_bad_dpo_settings_are_clear_errors():
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge"):
        DPOConfig(loss_type="kto")
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOConfig(beta=0.0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 0.5\)"):
        DPOConfig(label_smoothing=0.5)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="needs the replies' token counts"):
        dpo_loss(mx.zeros(1), mx.zeros(1), mx.zeros(1), mx.zeros(1), loss_type="ipo")


def letter_pair(tokenizer, s: str, wrong: str, system: str | None = None):
    record = {"prompt": s, "chosen": s[-1], "rejected": wrong}
    if system is not None:
        record["system"] = system
    return encode_pair(record, tokenizer, where="x")


def test_logps_score_the_reply_and_its_im_end_only(tiny, tokenizer):
    """On the tiny model: our log-probs equal transformers' log-softmax summed over exactly the
    reply's tokens and <|im_end|> (positions found from the tokenizer, not from our mask).
    Then with fixed logits: changing the logits that predict a prompt token, or the newline
    after <|im_end|>, leaves the log-prob unchanged; changing those predicting <|im_end|>
    changes it."""
    import torch

    pairs = [letter_pair(tokenizer, "abcab", "a"), letter_pair(tokenizer, "dd", "bc")]
    batch = make_preference_batch(PreferenceDataset(pairs), [0, 1])
    model = load_model(tiny)
    got = np.array(sequence_logps(model, batch.sequences))

    torch_model = load_torch_model(tiny, "float32")
    rows = [pairs[0].chosen, pairs[1].chosen, pairs[0].rejected, pairs[1].rejected]
    replies = ["b", "d", "a", "bc"]
    expected = []
    for example, reply, pair in zip(rows, replies, pairs * 2, strict=True):
        ids = torch.tensor([example.tokens])
        with torch.no_grad():
            logprobs = torch.log_softmax(torch_model(input_ids=ids).logits[0].double(), -1)
        start = pair.prompt_length
        n = len(tokenizer.encode(reply)) + 1  # the reply and <|im_end|>
        assert example.tokens[start + n - 1] == tokenizer.token_to_id("<|im_end|>")
        expected.append(sum(logprobs[t - 1, example.tokens[t]].item()
                            for t in range(start, start + n)))
    np.testing.assert_allclose(got, expected, rtol=2e-5)

    width = batch.sequences.inputs.shape[1]
    base = mx.array(np.random.default_rng(0).normal(size=(4, width, 512)).astype(np.float32))
    reference = np.array(sequence_logps(FixedLogits(base), batch.sequences))
    example, start = rows[0], pairs[0].prompt_length
    im_end_at = len(example.tokens) - 2
    for target, changes in ((1, False), (start - 1, False), (len(example.tokens) - 1, False),
                            (start, True), (im_end_at, True)):
        # Logits at input position t - 1 predict token t.
        bumped = np.array(base)
        bumped[0, target - 1] += np.random.default_rng(target).normal(size=512) * 3
        value = np.array(sequence_logps(FixedLogits(mx.array(bumped)), batch.sequences))
        assert (value[0] != reference[0]) == changes, target
        np.testing.assert_array_equal(value[1:], reference[1:])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_disabled_adapters_are_the_untouched_base_model(tiny, tokenizer, dora):
    """Reference log-probs of the adapted model (nonzero B, dropout on, training mode) equal
    those of the base model loaded separately, bit for bit; the policy's differ."""
    pairs = [letter_pair(tokenizer, s, w) for s, w in (("abc", "a"), ("dcba", "b"))]
    batch = make_preference_batch(PreferenceDataset(pairs), [0, 1]).sequences
    base = np.array(sequence_logps(load_model(tiny), batch))
    model = load_model(tiny)
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4, dropout=0.3, dora=dora))
    randomize_adapters(model)
    model.train()
    np.testing.assert_array_equal(np.array(reference_logps(model, batch)), base)
    assert model.training and all(layer.enabled for layer in lora_layers(model))
    model.eval()
    assert np.abs(np.array(sequence_logps(model, batch)) - base).max() > 1e-2


def test_trainable_non_adapter_weights_are_refused(tiny, tokenizer, tmp_path):
    """A trainable norm would move the 'reference' together with the policy."""
    model = load_model(tiny)
    apply_lora(model, LoRAConfig(rank=4))
    model.layers[0].input_layernorm.unfreeze()
    data = PreferenceDataset([letter_pair(tokenizer, "abc", "a")])
    with pytest.raises(ValueError, match="only adapter parameters may train.*input_layernorm"):
        train_dpo(model, tokenizer, {"train": data}, adapter_path=tmp_path,
                  config=TrainingConfig(iters=1, batch_size=1))


# ------------------------------------------------------------------------------ learning


def letter_preferences(tokenizer, items, seed: int):
    """Chosen: the last letter of the string (the rule); rejected: another letter of "abcd"."""
    rng = random.Random(seed)
    return PreferenceDataset([
        letter_pair(tokenizer, s, rng.choice([c for c in LETTERS if c != s[-1]]),
                    system="Answer.")
        for s in items])


def policy_preference_accuracy(model, dataset) -> float:
    """Share of pairs where the model itself gives the chosen reply the higher log-prob."""
    batch = make_preference_batch(dataset, range(len(dataset)))
    logps = np.array(sequence_logps(model, batch.sequences))
    n = len(dataset)
    return float((logps[:n] > logps[n:]).mean())


def test_dpo_learns_a_preference_that_holds_on_held_out_prompts(tiny, tokenizer, tmp_path):
    """Synthetic task: the prompt is a 3-6 letter string over "abcd"; the chosen reply is its
    last letter, the rejected one another letter. 128 training prompts, 32 held-out prompts
    that never occur in training (the answer letters themselves are all seen, so held-out
    tests the rule, not unseen tokens).

    Held-out, before training: the base model prefers the chosen reply in about half of the
    pairs (chance; measured 0.44), and TRL's reward accuracy is 0 (policy == reference, every
    pair a tie). After 100 DPO steps: the model prefers the chosen reply in >= 0.9 of the
    held-out pairs (measured 0.97), reward accuracy >= 0.85 (measured 0.94) and the mean reward
    margin >= 1.0 (measured 1.78, from 0)."""
    train_items, held_out_items = last_letter_items(128, 32)
    train_set = letter_preferences(tokenizer, train_items, seed=0)
    held_out = letter_preferences(tokenizer, held_out_items, seed=1)
    model = load_model(tiny)
    before = policy_preference_accuracy(model, held_out)
    assert 0.25 <= before <= 0.65
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=8, alpha=16))
    start = evaluate_dpo(model, held_out, batch_size=16)
    assert start["rewards/accuracies"] == 0.0 and start["rewards/margins"] == 0.0
    assert start["loss"] == pytest.approx(np.log(2))

    result = train_dpo(model, tokenizer, {"train": train_set, "valid": held_out},
                       adapter_path=tmp_path / "a", dpo=DPOConfig(beta=0.1),
                       config=TrainingConfig(iters=100, batch_size=8, learning_rate=1e-3,
                                             lr_schedule="constant", weight_decay=0.0,
                                             max_grad_norm=None, steps_per_eval=50))
    after = result.val_metrics[-1][1]
    assert [s for s, _ in result.val_metrics] == [50, 100]
    assert after["rewards/accuracies"] >= 0.85, after
    assert after["rewards/margins"] >= 1.0, after
    assert result.val_metrics[0][1]["rewards/margins"] < after["rewards/margins"]
    assert policy_preference_accuracy(model, held_out) >= 0.9
    assert np.mean(result.train_losses[-10:]) < 0.5 < np.mean(result.train_losses[:5])


# ------------------------------------------------------------ precompute, accumulate, resume


def small_task(tokenizer, n: int = 12):
    items, held = last_letter_items(n, 4, seed=3)
    return letter_preferences(tokenizer, items, 2), letter_preferences(tokenizer, held, 3)


def test_precomputed_reference_equals_on_the_fly_and_is_cached(tiny, tokenizer, tmp_path):
    """Precomputed values equal the reference pass of the training batches exactly; the cache
    is read back (also after adapters were added or trained), and recomputed when the data or
    the base weights change."""
    train_set, _ = small_task(tokenizer)
    model = load_model(tiny)
    file, cached = precompute_reference_logps(model, train_set, batch_size=4,
                                              cache_dir=tmp_path)
    assert not cached and file.parent == tmp_path and file.is_file()
    mx.random.seed(0)
    apply_lora(model, LoRAConfig(rank=4))
    randomize_adapters(model)
    plan = BatchSchedule(train_set, 4, seed=9)
    for index in range(len(plan)):
        batch = make_preference_batch(train_set, plan.indices(index))
        on_the_fly = np.array(reference_logps(model, batch.sequences))
        np.testing.assert_array_equal(train_set.ref_chosen[batch.indices], on_the_fly[:4])
        np.testing.assert_array_equal(train_set.ref_rejected[batch.indices], on_the_fly[4:])

    again = PreferenceDataset(list(train_set.examples))
    assert precompute_reference_logps(model, again, batch_size=2, cache_dir=tmp_path) == (
        file, True)
    np.testing.assert_array_equal(again.ref_chosen, train_set.ref_chosen)
    fewer = PreferenceDataset(train_set.examples[:-1])
    other_file, cached = precompute_reference_logps(model, fewer, cache_dir=tmp_path)
    assert not cached and other_file != file
    model.layers[0].mlp.down_proj.base.weight = model.layers[0].mlp.down_proj.base.weight * 1.01
    assert precompute_reference_logps(model, again, cache_dir=tmp_path)[1] is False
    file.write_bytes(b"damaged")
    assert precompute_reference_logps(load_model(tiny), again, cache_dir=tmp_path)[1] is False
    np.testing.assert_array_equal(again.ref_chosen, train_set.ref_chosen)


def run_small(tiny, tokenizer, adapter_path, *, dpo=None, config=None, pairs=12, **kwargs):
    train_set, valid = small_task(tokenizer, pairs)
    settings = dict(iters=8, batch_size=4, learning_rate=3e-3, warmup_steps=2, save_every=4,
                    seed=5, steps_per_eval=4)
    settings.update(config or {})
    model = load_model(tiny)
    result = train_dpo(model, tokenizer, {"train": train_set, "valid": valid},
                       adapter_path=adapter_path, config=TrainingConfig(**settings),
                       dpo=dpo or DPOConfig(beta=0.2), **kwargs)
    return model, result


def weights_of(model):
    return {k: np.array(v) for k, v in adapter_weights(model).items()}


def assert_same_weights(a, b, rtol=1e-5, atol=1e-7):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def test_training_with_precomputed_reference_gives_the_same_result(tiny, tokenizer, tmp_path):
    lora = LoRAConfig(rank=4, dropout=0.1)
    on_the_fly, first = run_small(tiny, tokenizer, tmp_path / "a", lora=lora)
    events = []
    pre, second = run_small(tiny, tokenizer, tmp_path / "b", lora=lora,
                            dpo=DPOConfig(beta=0.2, precompute_ref=True),
                            callback=lambda p: events.append(p) if p.event == "reference"
                            else None)
    assert [(p.split, p.metrics["cached"]) for p in events] == [("train", 0.0), ("valid", 0.0)]
    assert sorted(second.reference_files) == ["train", "valid"]
    np.testing.assert_array_equal(second.train_losses, first.train_losses)
    assert second.metrics == first.metrics and second.val_metrics == first.val_metrics
    assert_same_weights(weights_of(pre), weights_of(on_the_fly), rtol=0, atol=0)


def test_grad_accumulation_equals_one_big_batch(tiny, tokenizer, tmp_path):
    """2 micro-batches of 2 pairs give the update of 1 batch of 4 pairs (the per-pair losses
    are summed over micro-batches, then divided by the pair count)."""
    weights = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        model, _ = run_small(tiny, tokenizer, tmp_path / f"a{batch_size}", pairs=4,
                             lora=LoRAConfig(rank=4),
                             config={"iters": 1, "batch_size": batch_size,
                                     "grad_accumulation_steps": accumulation, "optimizer": "sgd",
                                     "warmup_steps": 0, "learning_rate": 1.0,
                                     "max_grad_norm": None})
        weights.append(weights_of(model))
    assert_same_weights(weights[1], weights[0])


def test_resume_continues_exactly(tiny, tokenizer, tmp_path):
    """8 steps straight == 4 steps, stop, resume for 4 (dropout, shuffling over epochs, warmup,
    AdamW state, validation metrics)."""
    lora = LoRAConfig(rank=4, dropout=0.2)
    straight, full = run_small(tiny, tokenizer, tmp_path / "straight", lora=lora)
    assert len(full.train_losses) == 8 and [s for s, _ in full.val_metrics] == [4, 8]

    def stop_at_4(p):
        return not (p.event == "step" and p.step == 4)

    _, first = run_small(tiny, tokenizer, tmp_path / "split", lora=lora, callback=stop_at_4)
    assert first.stopped_early and first.step == 4
    resumed, second = run_small(tiny, tokenizer, tmp_path / "split",
                                resume_adapter_file=tmp_path / "split" / "adapters.safetensors")
    np.testing.assert_allclose(first.train_losses + second.train_losses, full.train_losses,
                               rtol=1e-6)
    assert second.val_metrics[-1][0] == 8
    for name in METRICS:
        assert second.val_metrics[-1][1][name] == pytest.approx(full.val_metrics[-1][1][name],
                                                                rel=1e-5, abs=1e-6)
    assert_same_weights(weights_of(resumed), weights_of(straight))
    saved = json.loads((tmp_path / "split" / "adapter_config.json").read_text())
    assert saved["qwen2_mlx"]["dpo"]["beta"] == 0.2


# ---------------------------------------------------------------------------- CLI, example


def test_cli_trains_reports_metrics_and_writes_loadable_adapters(tiny, tmp_path):
    runner = CliRunner()
    adapters = tmp_path / "adapters"
    args = ["dpo", "--model", str(tiny), "--data", str(EXAMPLE / "data"), "--iters", "3",
            "--batch-size", "2", "--rank", "4", "--lr", "1e-3", "--steps-per-report", "1",
            "--steps-per-eval", "3", "--save-every", "2", "--adapter-path", str(adapters),
            "--precompute-ref", "--beta", "0.2"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    for text in ("Trainable parameters: ", "Reference log-probs of", "computed, cached in",
                 "Step 1/3 ", "rewards chosen", "acc ", "Step 3: val loss",
                 "rewards/accuracies", "saved adapters to"):
        assert text in result.stdout, text
    names = {p.name for p in adapters.iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "training_state.safetensors",
            "0000002_adapters.safetensors"} <= names
    assert any(n.startswith("reference_logps_") for n in names)
    again = runner.invoke(cli, args[:-2] + ["--iters", "0"])  # evaluate, cache read back
    assert again.exit_code == 0, again.output
    assert "Validation: loss" in again.stdout
    model, _ = load(tiny, adapter_path=adapters)
    assert len(lora_layers(model)) == 14

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                     '{"prompt": "a", "chosen": "b"}\n')
    result = runner.invoke(cli, ["dpo", "-m", str(tiny), "--data", str(bad), "--iters", "1"])
    assert result.exit_code == 1 and "train.jsonl:2: no 'rejected' key" in result.stderr
    result = runner.invoke(cli, ["dpo", "-m", str(tiny), "--data", str(bad),
                                 "--loss-type", "hinge", "--label-smoothing", "0.1"])
    assert result.exit_code == 1 and "sigmoid loss only" in result.stderr


def test_bundled_example_runs(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train_dpo.py", "--model", str(tiny), "--iters", "2",
                                      "--adapter-path", str(tmp_path / "a")])
    runpy.run_path(str(EXAMPLE / "train_dpo.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "held-out pairs before" in out and "after" in out


def test_example_data_is_valid(tokenizer):
    from qwen2_mlx.dpo import load_preference_datasets

    data = load_preference_datasets(EXAMPLE / "data", tokenizer)
    assert len(data["train"]) >= 16 and len(data["valid"]) >= 4
    prompts = {tuple(p.chosen.tokens[:p.prompt_length]) for p in data["train"].examples}
    assert not prompts & {tuple(p.chosen.tokens[:p.prompt_length])
                          for p in data["valid"].examples}

