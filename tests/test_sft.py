"""Instruction data and the sft stage: loss masks, chat templates, packing, bad input, start-up
checks, mixtures of instruction sources, and what a tuned model learns (scored through its chat
template and raw)."""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_code.config import PRESETS, ModelConfig, load_config
from megatron_code.data.chat import RoleTokenTemplate, template_for
from megatron_code.data.errors import DataError
from megatron_code.data.pipeline import collate
from megatron_code.data.sft import SFTDataset, check_sft_dataset, preprocess_sft, read_sft
from megatron_code.data.tokenizer import load_tokenizer
from megatron_code.kernels.ops import TORCH_OPS, build_attention
from megatron_code.model import GPT
from megatron_code.model.loss import sample_losses

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_utils import run_distributed  # noqa: E402
from tokenizer_zoo import zoo  # noqa: E402,F401  (a fixture)
from tool_modules import load_tool  # noqa: E402

MULTI_TURN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
              {"role": "assistant", "content": "It is 6."}]
EXAMPLES = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"messages": MULTI_TURN},
    {"prompt": "def one():\n", "completion": "    return 1\n"},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sft_data(tiny_corpus, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("sft")
    return preprocess_sft(write_jsonl(root / "in.jsonl", EXAMPLES), root / "examples", tiny_corpus.tokenizer,
                          progress=False)["prefix"]


def tiny_model(attention="sdpa", vocab=1024) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**PRESETS["tiny"], vocab_size=vocab), attention=build_attention(attention, "cpu")).eval()


def test_only_assistant_turns_carry_loss_and_megatron_core_reads_the_files(tiny_corpus, sft_data):
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    data = read_sft(sft_data)
    reference = IndexedDataset(sft_data)  # megatron-core's reader: document d = sequences 2d, 2d + 1
    assert len(data) == 3 and list(reference.document_indices) == [0, 2, 4, 6]
    responses = ["5<|end|>", "4<|end|>It is 6.<|end|>", "    return 1\n<|end|>"]
    whole = ["<|user|>Add the numbers.\n\n2 and 3<|end|><|assistant|>5<|end|>",
             "<|system|>Be brief.<|end|><|user|>What is 2 + 2?<|end|><|assistant|>4<|end|><|user|>And 3 + 3?<|end|>"
             "<|assistant|>It is 6.<|end|>",
             "<|user|>def one():\n<|end|><|assistant|>    return 1\n<|end|>"]
    for d in range(3):
        tokens, mask = reference[2 * d].astype(np.int64), reference[2 * d + 1]
        assert tokenizer.decode(tokens.tolist()) == whole[d]
        assert tokenizer.decode(tokens[mask == 1].tolist()) == responses[d]
        # the mask covers whole runs: each response's own encoding, then <|end|>
        runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        spans = [tokens[a:b].tolist() for a, b in zip(runs[::2], runs[1::2])]
        answers = [m["content"] for m in [*MULTI_TURN, {"role": "assistant", "content": "5"}]
                   if m["role"] == "assistant"]
        for span in spans:
            assert span[-1] == tokenizer.end_id and tokenizer.decode(span[:-1]) in answers + ["    return 1\n"]
            assert span[:-1] == tokenizer.encode(tokenizer.decode(span[:-1]))
    meta = json.loads(Path(f"{sft_data}.meta.json").read_text())
    assert meta["kind"] == "sft" and meta["examples"] == 3 and meta["template"]["kind"] == "role_tokens"


def test_changing_a_prompt_label_leaves_the_loss_and_a_response_label_changes_it(tiny_corpus, sft_data):
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    data = read_sft(sft_data)
    dataset = SFTDataset(data, np.arange(len(data)), 96, pack=True, seed=0, pad_id=tokenizer.pad_id)
    assert len(dataset) == 1  # all three examples in one sample
    batch = collate([dataset[0]], np.zeros(1), pin=False)
    model = tiny_model()

    def loss(labels):
        with torch.no_grad():
            hidden = model(batch["tokens"], batch["position_ids"], batch["document_ids"], return_hidden=True)
            return sample_losses(model, hidden, labels, batch["loss_mask"], TORCH_OPS)  # the trainer's loss

    base = loss(batch["labels"])
    prompt = torch.nonzero((batch["loss_mask"][0] == 0) & (batch["document_ids"][0] < 3)).flatten()
    response = torch.nonzero(batch["loss_mask"][0] == 1).flatten()
    loss_tokens = json.loads(Path(f"{sft_data}.meta.json").read_text())["loss_tokens"]
    assert len(prompt) > 20 and len(response) == loss_tokens
    for positions, changes in ((prompt, False), (response, True)):
        for p in positions[torch.linspace(0, len(positions) - 1, 6).long()].tolist():
            labels = batch["labels"].clone()
            labels[0, p] = (labels[0, p] + 1) % 1000
            assert torch.equal(loss(labels), base) != changes, p


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_an_example_packed_with_others_gives_its_logits_alone(tiny_corpus, sft_data, attention):
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    data = read_sft(sft_data)
    model = tiny_model(attention)
    for pack in (True, False) if attention == "sdpa" else (True,):  # unpacked: the same path as pretraining
        dataset = SFTDataset(data, np.arange(len(data)), 96, pack=pack, seed=0, pad_id=tokenizer.pad_id)
        for i in range(len(dataset)):
            sample = dataset[i]
            with torch.no_grad():
                logits = model(sample["tokens"][None], sample["position_ids"][None],
                               sample["document_ids"][None] if pack else None)[0]
            at = 0
            for e in dataset.examples_in(i).tolist():
                n = int(dataset.lengths[e]) - 1
                alone = torch.from_numpy(dataset.example_tokens(e)[:-1].astype(np.int64))
                assert torch.equal(sample["position_ids"][at: at + n], torch.arange(n))
                with torch.no_grad():
                    expected = model(alone[None])[0]
                torch.testing.assert_close(logits[at: at + n], expected, rtol=1e-5, atol=1e-5)
                at += n
            assert not sample["loss_mask"][at:].any()


def test_a_hugging_face_chat_template_is_rendered_by_transformers(tiny_corpus, tmp_path):
    """A folder whose Jinja template spells our role layout gives the same ids and mask as the
    role-token template: the assistant turns are found in transformers' own rendering."""
    folder = tmp_path / "hf_chat"
    shutil.copytree(tiny_corpus.hf_tokenizer, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["split_special_tokens"] = False  # the template's role strings are the special tokens
    config["chat_template"] = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf_template = template_for(load_tokenizer(folder))
    ours = template_for(load_tokenizer(tiny_corpus.tokenizer))
    assert type(hf_template).__name__ == "HFChatTemplate" and isinstance(ours, RoleTokenTemplate)
    for a, b in zip(hf_template.encode(MULTI_TURN), ours.encode(MULTI_TURN)):
        assert a.tolist() == b.tolist()
    assert hf_template.prompt_ids(MULTI_TURN[:2]) == ours.prompt_ids(MULTI_TURN[:2])
    assert ours.end_id in hf_template.stop_ids
    # the template is recorded with the data and checked against the tokenizer that trains on it
    prefix = preprocess_sft(write_jsonl(tmp_path / "in.jsonl", EXAMPLES), tmp_path / "d", folder,
                            progress=False)["prefix"]
    check_sft_dataset(prefix, load_tokenizer(folder))
    with pytest.raises(DataError, match="made with the chat template 'hf', which .* has no chat template"):
        check_sft_dataset(prefix, load_tokenizer(tiny_corpus.tokenizer))
    config["chat_template"] = config["chat_template"].replace("<|end|>", "<|end|>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"different chat template .* \(sha256 differ\)"):
        check_sft_dataset(prefix, load_tokenizer(folder))


def test_a_tokenizer_without_role_tokens_template_or_pad_gets_plain_text_headers(zoo, tmp_path):
    """GPT-2 style: no role tokens, no chat template, no pad token. Headers are text, each
    response ends with the end-of-document token, which also fills what no example uses."""
    from megatron_code.data.sft import build_sft_file

    tokenizer = load_tokenizer(zoo.hf_gpt2)
    assert tokenizer.pad_id < 0
    prefix = preprocess_sft(write_jsonl(tmp_path / "in.jsonl", EXAMPLES), tmp_path / "gpt2", zoo.hf_gpt2,
                            progress=False)["prefix"]
    assert json.loads(Path(f"{prefix}.meta.json").read_text())["template"]["kind"] == "text"
    source = build_sft_file("text", prefix, 1.0, tokenizer, 96, "100,0,0", 0, True, print)
    eod, answers = tokenizer.decode([tokenizer.eod_id]), []
    for i in range(len(source.train)):
        sample = source.train[i]
        answers += tokenizer.decode(sample["labels"][sample["loss_mask"] == 1].tolist()).split(eod)[:-1]
        assert tokenizer.decode(sample["tokens"].tolist()).startswith(("### User:\n", "### System:\n"))
        padding = sample["document_ids"] == len(source.train.examples_in(i))
        assert padding.any() and (sample["tokens"][padding] == tokenizer.eod_id).all()
    assert sorted(answers) == sorted(["5", "4", "It is 6.", "    return 1\n"])


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"prompt": "hi"}', "no assistant turn"),
    ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     "messages[0] has unknown role 'bot'"),
    ('{"instruction": "Say something.", "output": "  "}', "empty response"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}, {"role": "assistant", "content": ""}]}',
     "empty response (assistant turn 2 of 2)"),
    ('{"instruction": "Say something.", "output": "hi"', "invalid JSON"),
    ('{"text": "pretraining text"}', "not an instruction example"),
])
def test_bad_input_gets_one_line_naming_file_and_line(tiny_corpus, tmp_path, capsys, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[0], line])
    tool = load_tool("preprocess_sft")
    assert tool.main(["--input", str(path), "--output-prefix", str(tmp_path / "out"),
                      "--tokenizer-model", str(tiny_corpus.tokenizer), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: ") and message in err and "\n" not in err
    assert not list(tmp_path.glob("out*"))  # nothing half-written


def test_overlong_examples_are_truncated_or_dropped_and_counted(tiny_corpus, tmp_path):
    long_answer = {"prompt": "Count.", "completion": " ".join(str(i) for i in range(40))}
    long_prompt = {"prompt": "Read: " + "word " * 60, "completion": "ok"}
    path = write_jsonl(tmp_path / "in.jsonl", [EXAMPLES[0], long_answer, long_prompt])
    cut = preprocess_sft(path, tmp_path / "cut", tiny_corpus.tokenizer, max_length=30, progress=False)
    assert (cut["examples"], cut["truncated"], cut["dropped"], cut["dropped_no_response"]) == (3, 1, 1, 1)
    data = read_sft(tmp_path / "cut")
    assert len(data) == 2 and data.sequence_lengths[2:].tolist() == [30, 30]  # the long answer, cut
    drop = preprocess_sft(path, tmp_path / "drop", tiny_corpus.tokenizer, max_length=30, overflow="drop",
                          progress=False)
    assert (drop["truncated"], drop["dropped"]) == (0, 2) and len(read_sft(tmp_path / "drop")) == 1


def sft_overrides(tiny_corpus, sources: dict, out, init_from, *extra):
    listed = ", ".join(f"{{name: {n}, prefix: '{p}', weight: 1}}" for n, p in sources.items())
    return ["--model.preset=tiny", f"--data.sources=[{listed}]", f"--data.tokenizer={tiny_corpus.tokenizer}",
            "--data.seq_length=64", "--data.split=90,10,0", "--train.stage=sft", f"--checkpoint.init_from={init_from}",
            "--train.micro_batch_size=4", "--train.global_batch_size=8", "--train.progress=false",
            "--train.eval_interval=0", "--optim.warmup_steps=1", f"--train.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def pretrained(tiny_corpus, tiny_indexed, tmp_path_factory) -> Path:
    """A tiny model after two pretraining steps: what the sft stage starts from."""
    from megatron_code.training.trainer import Trainer

    out = tmp_path_factory.mktemp("pretrained")
    sources = ", ".join(f"{{name: {n}, prefix: '{p}'}}" for n, p in tiny_indexed.items())
    Trainer(load_config(None, ["--model.preset=tiny", f"--data.sources=[{sources}]", "--data.seq_length=64",
                               f"--data.tokenizer={tiny_corpus.tokenizer}", "--train.steps=2", "--optim.warmup_steps=1",
                               "--train.progress=false",
                               "--train.global_batch_size=2", "--train.micro_batch_size=2", "--train.eval_interval=0",
                               f"--train.output_dir={out}"])).train()
    return out


@pytest.fixture(scope="module")
def two_sources(tiny_corpus, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("two_sources")
    text = [{"instruction": f"What is {a} + {b}?", "output": str(a + b)} for a in range(10) for b in range(10)]
    code = [{"prompt": f"def add_{a}(x):\n", "completion": f"    return x + {a}\n"} for a in range(100)]
    return {name: preprocess_sft(write_jsonl(root / f"{name}.jsonl", records), root / name, tiny_corpus.tokenizer,
                                 progress=False)["prefix"] for name, records in (("text", text), ("code", code))}


def test_mixture_proportions_over_an_sft_run_follow_the_schedule(tiny_corpus, two_sources, pretrained, tmp_path):
    from megatron_code.training.trainer import Trainer

    steps = 16
    result = Trainer(load_config(None, sft_overrides(tiny_corpus, two_sources, tmp_path, pretrained,
                                                     f"--train.steps={steps}", "--data.schedule=stepwise_decrease",
                                                     "--train.eval_interval=16"))).train()
    assert result.step == steps and set(result.valid_losses) == {"text", "code"}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    code_share = [0.5] * 4 + [0.4] * 4 + [0.3] * 8  # 5:5, 6:4, 7:3, 7:3 text:code
    assert [r["weight/code"] for r in lines] == pytest.approx(code_share)
    for phase in range(4):  # within each phase, every prefix of batches is within half a sample
        counted, due = 0, 0.0
        for r, share in zip(lines[4 * phase: 4 * phase + 4], code_share[4 * phase: 4 * phase + 4]):
            counted, due = counted + r["samples/code"], due + 8 * share
            assert abs(counted - due) <= 0.5 and r["samples/code"] + r["samples/text"] == 8
    assert all("loss/text" in r and "loss/code" in r for r in lines)


def test_an_instruction_source_of_several_files_mixes_them_by_weight(tiny_corpus, two_sources, pretrained, tmp_path):
    """One source `mixed` made of the arithmetic file (weight 1) and the code file (weight 3): each
    packed sample comes from one file; after the source's t-th sample the code file has served
    3t/4 of them within half a sample."""
    from megatron_code.data.pipeline import DataPipeline

    files = ", ".join(f"{{prefix: '{two_sources[n]}', weight: {w}}}" for n, w in (("text", 1), ("code", 3)))
    config = load_config(None, sft_overrides(tiny_corpus, {}, tmp_path, pretrained, "--train.steps=6",
                                             f"--data.sources=[{{name: mixed, prefix: [{files}]}}]"))
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    pipeline = DataPipeline(config, tokenizer, log=lambda _: None)
    texts = [tokenizer.decode(t[t != tokenizer.eod_id].tolist()) for _ in range(6)
             for b in pipeline.next_step().micro_batches for t in b["tokens"]]
    is_code = np.array(["def add_" in text for text in texts])
    assert all(("What is" in text) != code for text, code in zip(texts, is_code))
    assert np.abs(np.cumsum(is_code) - 0.75 * np.arange(1, 49)).max() <= 0.5
    assert set(pipeline.state_dict()["files"]["mixed"]["positions"].values()) == {12, 36}
    pipeline.close()


@pytest.mark.parametrize("pack", [True, False])
def test_token_counts_leave_out_padding(tiny_corpus, two_sources, pretrained, tmp_path, pack):
    """tokens/<source> (and the run's totals) count the positions holding an example's tokens:
    against the batches' own positions that are not the pad id (which no text encodes to)."""
    from megatron_code.data.pipeline import DataPipeline

    config = load_config(None, sft_overrides(tiny_corpus, two_sources, tmp_path, pretrained, "--train.steps=4",
                                             f"--data.pack={str(pack).lower()}"))
    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    pipeline = DataPipeline(config, tokenizer, log=lambda _: None)
    totals = dict.fromkeys(two_sources, 0)
    for _ in range(4):
        step = pipeline.next_step()
        real = {name: 0 for name in two_sources}
        for batch in step.micro_batches:
            for tokens, source in zip(batch["tokens"], batch["source"].tolist()):
                real[pipeline.names[source]] += int((tokens != tokenizer.pad_id).sum())
        assert {n: step.metrics[f"tokens/{n}"] for n in real} == real and step.metrics["tokens"] == sum(real.values())
        assert sum(real.values()) < 8 * 64  # there was padding to leave out
        totals = {n: totals[n] + real[n] for n in real}
    assert pipeline.state_dict()["tokens"] == totals
    pipeline.close()


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("mix_by", ["tokens", "loss_tokens", "examples"])
def test_mixing_by_tokens_or_examples_shares_them_as_scheduled(tiny_corpus, two_sources, pretrained, tmp_path, pack,
                                                               mix_by):
    """Text 0.7, code 0.3 by the unit: after every step, text's units are within one sample's
    units of 0.7 of all units (counted here from the batches themselves: positions that are not
    the pad id, positions with loss, examples); two data-parallel ranks split the same batches; a
    resume mid-run continues the uninterrupted order. Mixing by samples misses the unit's share
    (but for examples without packing, where a sample is an example)."""
    from megatron_code.data.pipeline import DataPipeline

    def pipeline(unit, dp_rank=0, dp_size=1):
        config = load_config(None, sft_overrides(tiny_corpus, two_sources, tmp_path, pretrained, "--train.steps=12",
                                                 f"--data.pack={str(pack).lower()}", f"--data.mix_by={unit}",
                                                 "--data.schedule=[{start: 0, weights: {text: 7, code: 3}}]"))
        return DataPipeline(config, tokenizer, dp_rank, dp_size, log=lambda _: None)

    def count(batch) -> np.ndarray:
        if mix_by == "tokens":
            return (batch["tokens"] != tokenizer.pad_id).sum(1)
        if mix_by == "loss_tokens":
            return batch["loss_mask"].sum(1)
        return ((batch["position_ids"] == 0) & (batch["tokens"] != tokenizer.pad_id)).sum(1)  # examples start at 0

    def run(data, steps):
        return [[(int(s), tuple(t.tolist()), int(n)) for b in data.next_step().micro_batches
                 for s, t, n in zip(b["source"], b["tokens"], count(b))] for _ in range(steps)]

    tokenizer = load_tokenizer(tiny_corpus.tokenizer)
    whole = run(pipeline(mix_by), 12)
    served = np.cumsum([[sum(n for s, _, n in step if s == d) for d in (0, 1)] for step in whole], 0)
    largest = max(n for step in whole for _, _, n in step)
    assert np.abs(served[:, 0] - 0.7 * served.sum(1)).max() <= largest
    by_samples = run(pipeline("samples"), 12)
    unit_share = sum(n for step in by_samples for s, _, n in step if s == 0) / sum(n for step in by_samples
                                                                                for _, _, n in step)
    if mix_by != "examples" or pack:  # (one example per sample: examples are samples)
        assert abs(served[-1, 0] / served[-1].sum() - 0.7) < abs(unit_share - 0.7)
    halves = [run(pipeline(mix_by, r, 2), 12) for r in range(2)]
    assert [a + b for a, b in zip(*halves)] == whole
    first = pipeline(mix_by)
    head = run(first, 5)
    resumed = pipeline(mix_by)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + run(resumed, 7) == whole


def _tune(args: list[str]) -> dict:
    from megatron_code.training.trainer import Trainer

    result = Trainer(load_config(None, args)).train()
    return {"losses": result.losses, "valid": result.valid_losses}


def _tune_layouts(rank: int, world_size: int, runs: list[list[str]]) -> list[dict]:
    return [_tune(args) for args in runs]


def test_packed_tuning_under_tensor_and_pipeline_parallelism(tiny_corpus, two_sources, pretrained, tmp_path):
    """Packed examples (document ids through every stage and head shard) tune alike in one
    process and on two ranks split by tensor or by pipeline: losses and validation per source."""
    def args(name, *extra):
        return sft_overrides(tiny_corpus, two_sources, tmp_path / name, pretrained, "--train.steps=4",
                             "--train.eval_interval=4", "--data.schedule=uniform", "--optim.lr=3e-3",
                             "--train.micro_batch_size=2", *extra)
    reference = _tune(args("one"))
    runs = [args("tp2", "--parallel.tensor=2"), args("pp2", "--parallel.pipeline=2", "--parallel.schedule=1f1b")]
    for run in run_distributed(_tune_layouts, world_size=2, timeout_s=600, args=(runs,))[0]:
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
        assert run["valid"] == pytest.approx(reference["valid"], rel=1e-5)


def test_sft_start_up_checks(tiny_corpus, tiny_indexed, two_sources, pretrained, tmp_path):
    from megatron_code.config import ConfigError
    from megatron_code.training.checkpoint import CheckpointError
    from megatron_code.training.trainer import Trainer

    with pytest.raises(ConfigError, match="set checkpoint.init_from"):
        load_config(None, sft_overrides(tiny_corpus, two_sources, tmp_path, "")[:-1] + ["--checkpoint.init_from="])
    with pytest.raises(DataError, match="'text' .* is not instruction data"):
        Trainer(load_config(None, sft_overrides(tiny_corpus, tiny_indexed, tmp_path, pretrained)))
    plain = sft_overrides(tiny_corpus, two_sources, tmp_path, pretrained)
    with pytest.raises(DataError, match="holds instruction data .* set train.stage=sft"):
        Trainer(load_config(None, [a for a in plain if not a.startswith(("--train.stage", "--checkpoint"))]))
    with pytest.raises(CheckpointError, match="model.hidden_size: checkpoint 64, this config 128"):
        Trainer(load_config(None, plain + ["--model.hidden_size=128"]))


def test_epochs_set_the_steps_and_unpacked_data_pads(tiny_corpus, two_sources, pretrained, tmp_path):
    from megatron_code.training.trainer import Trainer

    trainer = Trainer(load_config(None, sft_overrides(tiny_corpus, {"text": two_sources["text"]}, tmp_path, pretrained,
                                                      "--train.epochs=2", "--data.pack=false")))
    assert len(trainer.data.sources[0].files[0].train) == 90  # one example per sample
    assert trainer.config.train.steps == 23  # ceil(2 x 90 / 8)
    batch = trainer.data.next_step().micro_batches[0]
    # one sum's digits and <|end|> carry loss, then padding
    assert "document_ids" not in batch and set(batch["loss_mask"].sum(1).tolist()) <= {2.0, 3.0}
    trainer.data.close()


@pytest.fixture(scope="module")
def tuned_on_sums(tiny_corpus, pretrained, tmp_path_factory) -> SimpleNamespace:
    """Sums of two digits in five phrasings: a tiny model tuned 180 steps on 400 questions, the
    other 100 held out (other phrasings of the same sums); held-out loss and exact match (greedy
    answer through the chat template) before and after, and the run directory."""
    from megatron_code.data.instructions import make_instructions
    from megatron_code.evaluation.lm import gpt_next_logits, greedy
    from megatron_code.training.trainer import Trainer

    root = tmp_path_factory.mktemp("sums")
    records = make_instructions({"digit_sums": 500}, seed=0)
    prefix = preprocess_sft(write_jsonl(root / "sums.jsonl", records), root / "sums", tiny_corpus.tokenizer,
                            progress=False)["prefix"]
    held_out = records[400:]  # data.split=80,20,0 holds out the last fifth of the file
    trainer = Trainer(load_config(None, sft_overrides(
        tiny_corpus, {"sums": prefix}, root / "run", pretrained, "--data.split=80,20,0", "--train.steps=180",
        "--train.micro_batch_size=16", "--train.global_batch_size=16", "--optim.lr=5e-3", "--optim.min_lr=5e-4",
        "--optim.warmup_steps=5")))
    template, model = template_for(trainer.tokenizer), trainer.model.parts[0]  # one process: the whole model

    def exact_match() -> float:
        model.eval()
        prompts = [template.prompt_ids([{"role": "user", "content": r["instruction"]}]) for r in held_out]
        answers = greedy(gpt_next_logits(model, trainer.tokenizer.vocab_size), prompts, 4, 64,
                         lambda out: out[-1] in template.stop_ids)
        model.train()
        return sum(trainer.tokenizer.decode([i for i in ids if i not in template.stop_ids]) == r["output"]
                   for ids, r in zip(answers, held_out)) / len(held_out)

    before = trainer.evaluate()["sums"], exact_match()
    trainer.train()
    return SimpleNamespace(run=root / "run", prefix=prefix, held_out=held_out, before=before,
                           after=(trainer.evaluate()["sums"], exact_match()))


def test_a_tiny_model_learns_a_generated_instruction_set(tuned_on_sums):
    """Held-out loss falls by more than half, and exact match on the held-out questions beats
    the best answer-blind guess (sum 9 is the commonest: 10%) by far."""
    (before_loss, before_match), (after_loss, after_match) = tuned_on_sums.before, tuned_on_sums.after
    assert after_loss < 0.5 * before_loss, (before_loss, after_loss)
    assert before_match <= 0.1 and after_match >= 0.4, (before_match, after_match)


def test_the_evaluators_prompt_a_tuned_model_through_its_chat_template(tuned_on_sums, tiny_corpus, tmp_path):
    """The held-out sums as a multiple-choice task: the tuned model scores higher fed each question
    as a user turn of its template (found by `auto` in its data's meta) than fed it raw; its
    answers, generated after the assistant header, stop at <|end|>."""
    import random

    from megatron_code.evaluation.code import complete
    from megatron_code.evaluation.lm import load_language_model
    from megatron_code.evaluation.score import chat_template_for, score_tasks
    from megatron_code.data.corpus import write_jsonl
    from megatron_code.evaluation.tasks import load_task

    rng = random.Random(0)
    items = []
    for r in tuned_on_sums.held_out:
        options = [r["output"], *rng.sample([str(v) for v in range(19) if str(v) != r["output"]], 3)]
        rng.shuffle(options)
        items.append({"question": r["instruction"], "options": options, "answer": options.index(r["output"])})
    task = load_task(write_jsonl(tmp_path / "held_out_sums.jsonl", items))
    model = load_language_model(tuned_on_sums.run)
    assert model.tuned_on == (tuned_on_sums.prefix,)
    (chat,), record = score_tasks(model, [task], "auto", log=lambda line: None)
    (raw,), raw_record = score_tasks(model, [task], "none", log=lambda line: None)
    assert (record["prompt_format"], chat.prompt_format, raw_record["prompt_format"]) == (
        "chat:role_tokens", "chat:role_tokens", "raw")
    assert record["chat_template"] == json.loads(Path(f"{tuned_on_sums.prefix}.meta.json").read_text())["template"]
    assert chat.metrics["acc"] >= 0.8 and raw.metrics["acc"] <= chat.metrics["acc"] - 0.3, (chat.metrics,
                                                                                           raw.metrics)
    template = chat_template_for(model, "auto")
    fed, returned = [], []

    def generate(prompts, max_new_tokens, finished):
        fed.extend(prompts)
        returned.extend(model.generate(prompts, max_new_tokens, finished))
        return returned[-len(prompts):]
    questions = [r["instruction"] for r in tuned_on_sums.held_out]
    answers = complete(replace(model, generate=generate), questions, 8, template=template)
    assert fed == [template.prompt_ids([{"role": "user", "content": q}]) for q in questions]
    assert all(template.end_id not in ids[:-1] for ids in returned)  # each row stopped at its first <|end|>
    assert sum(ids[-1] == template.end_id for ids in returned) >= 0.9 * len(returned)
    assert sum(a == r["output"] for a, r in zip(answers, tuned_on_sums.held_out)) >= 0.4 * len(questions)

    moved = replace(model, tuned_on=(str(tmp_path / "moved" / "sums"),))
    with pytest.raises(DataError, match=r"tuned on .*moved/sums, whose .*meta.json .* is not there; pass "
                                        r"--chat-template role_tokens\|hf\|text"):
        chat_template_for(moved, "auto")
    text = preprocess_sft(write_jsonl(tmp_path / "t.jsonl", EXAMPLES), tmp_path / "t", tiny_corpus.tokenizer,
                          template="text", progress=False)["prefix"]
    with pytest.raises(DataError, match="tuned on data made with different chat templates .*: role_tokens, .*: text"):
        chat_template_for(replace(model, tuned_on=(tuned_on_sums.prefix, text)), "auto")


def test_an_sft_recipe_whose_warmup_exceeds_the_epoch_stops_when_the_data_sets_the_steps(
        tiny_corpus, two_sources, pretrained, tmp_path):
    """Ma et al.'s CC recipe keeps the released code's 2000-step warmup; on 180 examples one
    epoch is 23 steps, known only once the data is read: the run stops there, with one line."""
    from megatron_code.config import ConfigError
    from megatron_code.training.trainer import Trainer

    recipe = Path(__file__).parent.parent / "examples" / "recipes" / "sft" / "ma_sft_cc.yaml"
    overrides = [a for a in sft_overrides(tiny_corpus, two_sources, tmp_path / "run", pretrained)
                 if not a.startswith("--optim.warmup_steps")]
    config = load_config(recipe, overrides)
    assert (config.optim.warmup_steps, config.train.epochs, config.data.pack) == (2000, 1, False)
    with pytest.raises(ConfigError) as stop:
        Trainer(config)
    assert str(stop.value).startswith("optim.warmup_steps=2000 is longer than the run's 23 steps (train.steps)")
    assert "\n" not in str(stop.value) and not (tmp_path / "run" / "checkpoints").exists()
