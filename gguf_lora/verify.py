"""`gguf-lora verify`: does a GGUF LoRA (or a merged GGUF) answer like transformers + peft with the adapter?

The reference is the PEFT adapter on the Hugging Face base in PyTorch. Each GGUF is run by the pinned
llama-server: a LoRA file on the base GGUF (one server for the base and every LoRA file, each request naming
every adapter's scale, prompt cache off), a merged file on its own server, one at a time. llama-server
generates N greedy tokens per prompt and returns the log-probabilities of its top tokens at every step;
PyTorch runs the same token sequence once (teacher forcing) and gives the whole distribution at each step.

Three sets of figures, on the same token positions:
- error: the file vs transformers + peft;
- floor: the bare base GGUF vs the bare HF base (what the GGUF pipeline costs with no adapter at all);
- effect: transformers + peft vs the bare HF base (how far the adapter moves the model).

The verdict compares the error (mean |Δ log-prob|) with the floor and with the effect:
- "matches": within twice the floor plus 0.5% of the effect (what the file's own precision costs: an f16
  LoRA rounds the update by ~0.03% of the effect, measured) — the GGUF is as faithful as the base itself;
- otherwise the ways conversions go wrong are simulated in PyTorch, each on the file's own greedy path:
  the adapter at another strength (a scale error; the factor is fitted) and adapter modules switched off
  (dropped targets; ranked by the gradient of the error with respect to each module's scale). One that at
  least halves the error names the cause, and the file is "wrong";
- an error no hypothesis explains is "quantization noise" when the file is of lower precision and the
  error is within the floor at that precision: for a merged file, the floor of the same base quantized to
  the file's type (measured: quantized by llama-quantize, run, compared with the HF base); for a LoRA file
  in f16 / bf16 / q8_0 (or a merge whose type is not recorded), 5% of the effect. Anything else is "wrong".
A bug smaller than the quantization noise cannot be told from it; a warning says when the adapter's
effect is within the floor (a file that dropped the adapter would then pass as well).

llama-server runs with an f32 KV cache and flash attention off, so that the floor measures the weights,
not the cache (its defaults add ~5e-3 in log-probability of their own).
"""
from __future__ import annotations

import json
import math
import subprocess
import tempfile
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np

from .base import read_gguf_base
from .errors import GgufLoraError, InputError, MissingDependencyError, ServerError
from .gguf_read import GGUFFile
from .peft import PeftAdapter, load_adapter

# Default prompts: user turns rendered through the chat template, so template problems show up too.
DEFAULT_PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France? Answer in one word.",
    "Explain recursion to a ten-year-old in two sentences.",
    "List three prime numbers and say why they are prime.",
]

# Verdict thresholds; the module docstring says why each is what it is.
MATCH_FLOOR = 2.0  # "within the floor": error <= MATCH_FLOOR * floor + MATCH_EFFECT * effect + MATCH_ABS
MATCH_EFFECT = 0.005
MATCH_ABS = 1e-4
LORA_NOISE = 0.05  # a lossy LoRA file (f16, bf16, q8_0) rounds the adapter's update by up to this fraction
EXPLAINED = 0.5  # a hypothesis explains the error when it at least halves it
MIN_SCALE_ERROR = 0.05  # a fitted strength within 5% of 1 is not a scale bug
MAX_PROBS = 1024  # log-probabilities asked per step on a large vocabulary (the rest is one KL bucket)
LOWEST = -1e30  # llama-server writes FLT_LOWEST for a probability that underflowed to 0

# Exact numerics: f32 KV cache and no flash attention (whose CPU kernel rounds Q to f16); one slot.
# --no-repack: the repacked quantized kernels only reorder weights for speed, and the AMX one dies of
# SIGILL on some Xeons (tile config lost; llama.cpp PR #26954, open): the plain kernels are the same math.
EXACT_ARGS = ["--cache-type-k", "f32", "--cache-type-v", "f32", "--flash-attn", "off", "-np", "1", "--no-repack"]

Progress = Callable[[str], None]


@dataclass
class Figures:
    """How far one model's next-token distributions are from another's over the same greedy steps."""

    max_dlogprob: float  # max |Δ log-prob| over the top-k tokens of every step
    mean_dlogprob: float  # mean of the same
    kl: float  # mean over steps of KL(reference || checked), nats
    kl_max: float
    greedy_agree: int  # steps whose greedy token is the reference's argmax too
    steps: int
    greedy_identical: int  # prompts whose whole greedy continuation is the reference's
    prompts: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TemplateCheck:
    """The chat template a GGUF carries vs the HF tokenizer's, and what llama-server's chat path tokenizes."""

    gguf_has: bool
    hf_has: bool
    same_text: bool | None  # None when either has none
    tokens_same: int  # prompts for which llama-server's chat rendering + tokenizer gives transformers' ids
    checked: int
    first_difference: str = ""

    @property
    def ok(self) -> bool:
        return self.same_text is not False and self.tokens_same == self.checked

    def note(self) -> str:
        if not self.hf_has:
            return "the HF tokenizer has no chat template: prompts are plain text"
        parts = []
        if not self.gguf_has:
            parts.append("the GGUF has no chat template (llama-server falls back to its own guess)")
        elif self.same_text is False:
            parts.append("the GGUF's chat template differs from the HF tokenizer's")
        else:
            parts.append("the GGUF's chat template is the HF tokenizer's")
        if self.checked:
            if self.tokens_same == self.checked:
                parts.append(f"llama-server's chat prompt tokens equal transformers' for all {self.checked} prompts")
            else:
                parts.append(f"llama-server's chat prompt tokens differ from transformers' for "
                             f"{self.checked - self.tokens_same} of {self.checked} prompts ({self.first_difference})")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "note": self.note()}


@dataclass
class FileReport:
    path: str
    kind: str  # "lora" (run on the base with --lora), "merged" (run alone), "converted" (verify converted it)
    verdict: str  # "matches" | "quantization noise" | "wrong"
    cause: str  # why, in one sentence
    error: Figures | None = None  # the file vs transformers + peft (None: llama-server refused the file)
    effect: Figures | None = None  # transformers + peft vs the bare HF base, on the file's greedy path
    floor: Figures | None = None  # the bare base GGUF vs the bare HF base
    ratio_floor: float = math.inf  # mean |Δ| of the error / of the floor
    ratio_effect: float = math.inf  # mean |Δ| of the error / of the effect
    types: dict[str, int] = field(default_factory=dict)  # tensor type -> count
    lossy: bool = False  # holds tensors of lower precision than the path the floor measured
    precision_floor: Figures | None = None  # a lossy merge: the base quantized the same way vs the HF base
    precision_floor_of: str = ""
    scale_factor: float | None = None  # fitted strength of the adapter in the file (1 = PEFT's)
    dropped: list[str] = field(default_factory=list)  # adapter modules without effect in the file
    template: TemplateCheck | None = None

    @property
    def ok(self) -> bool:
        return self.verdict == "matches"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["template"] = self.template.to_dict() if self.template else None
        d["ok"] = self.ok
        for key in ("ratio_floor", "ratio_effect"):
            d[key] = None if math.isinf(d[key]) else d[key]
        return d


@dataclass
class VerifyReport:
    adapter: str
    hf_base: str
    base: str
    dtype: str  # the reference's torch dtype
    prompts: int
    tokens: int  # greedy tokens per prompt
    top_k: int
    n_probs: int  # log-probabilities read per step; == vocab means the KL is exact
    vocab: int
    kl_exact: bool
    chat: bool  # prompts went through the chat template
    floor: Figures
    template: TemplateCheck
    files: list[FileReport]
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.files)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("floor", "template", "files")},
                "ok": self.ok, "floor": self.floor.to_dict(), "template": self.template.to_dict(),
                "files": [f.to_dict() for f in self.files]}


# --- prompts ---------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    ids: list[int]  # what both sides are fed
    messages: list[dict] | None  # chat prompts: the messages (for llama-server's own chat rendering)


def read_prompts(path: str | Path) -> list[dict]:
    """A text file (one user message per line) or JSONL ({"messages": [...]} or {"prompt": "raw text"})."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"Cannot read prompts from {path}", str(e), "pass a UTF-8 text or JSONL file") from None
    items = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path} line {n} is not JSON", str(e), "write one JSON object per line") from None
            ok = isinstance(doc, dict) and (
                isinstance(doc.get("prompt"), str) or
                (isinstance(doc.get("messages"), list) and doc["messages"] and
                 all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                     for m in doc["messages"])))
            if not ok:
                raise InputError(f"{path} line {n} is neither {{\"prompt\": TEXT}} nor {{\"messages\": [...]}}", "",
                                 "give each line a prompt string or a list of {role, content} messages")
            items.append({"prompt": doc["prompt"]} if "prompt" in doc else {"messages": doc["messages"]})
        else:
            items.append({"messages": [{"role": "user", "content": line.strip()}]})
    if not items:
        raise InputError(f"{path} holds no prompts", "", "write one prompt per line")
    return items


# --- the reference: transformers + peft, loaded once ---------------------------------------------------------

def _import_torch_stack():
    missing = []
    for name in ("torch", "transformers", "peft"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f"Verify needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                                     "not installed", "the reference is the adapter run by transformers + peft in "
                                     "PyTorch", "install them with: pip install 'gguf-lora[verify]'")


class Reference:
    """The adapter in transformers + peft. One model in memory; the bare base is the adapter disabled, and
    the diagnosis hypotheses (another strength, modules off) change PEFT's per-module scaling in place."""

    def __init__(self, hf_base: Path, adapter: Path, dtype: str):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        from transformers.utils import logging as hf_logging

        tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else hf_base
        bars = hf_logging.is_progress_bar_enabled()
        try:
            hf_logging.disable_progress_bar()  # the library prints nothing
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
                model = AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32 if dtype == "float32"
                                                             else "auto")
                self.model = PeftModel.from_pretrained(model, adapter).eval()
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise InputError(f"Transformers + peft could not load the reference ({first})",
                             f"the HF base is {hf_base}, the adapter {adapter}",
                             "pass the Hugging Face folder of the model the adapter was trained on with --hf-base"
                             ) from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self.tokenizer_source = tok_dir
        for p in self.model.parameters():  # inference only; scale_gradient differentiates w.r.t. scales alone
            p.requires_grad_(False)
        self.dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        self.name = self.model.active_adapter if isinstance(self.model.active_adapter, str) else "default"
        self.layers = {}  # module path (as PEFT names it, without base_model.model.) -> LoraLayer
        for name, module in self.model.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and self.name in scaling and hasattr(module, "lora_A"):
                self.layers[name.removeprefix("base_model.model.")] = module
        self.vocab = int(self.model.get_output_embeddings().weight.shape[0])
        self._cache: OrderedDict = OrderedDict()

    def logprobs(self, prompt: list[int], generated: list[int], hypothesis=None) -> np.ndarray:
        """log p(· | prompt + generated[:i]) for every step i, shape (len(generated), vocab), float32.

        hypothesis: None (the adapter as PEFT applies it), "base" (adapter disabled), ("scale", c) or
        ("drop", frozenset of module paths)."""
        key = (hypothesis, tuple(prompt), tuple(generated))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        torch = self.torch
        ids = torch.tensor([prompt + generated[:-1]])
        with torch.no_grad(), self._applied(hypothesis):
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1:]
            out = torch.log_softmax(logits.double(), -1).float().numpy()
        self._cache[key] = out
        while len(self._cache) > 16:
            self._cache.popitem(last=False)
        return out

    @contextmanager
    def _applied(self, hypothesis) -> Iterator[None]:
        if hypothesis == "base":
            with self.model.disable_adapter():
                yield
            return
        saved = {name: layer.scaling[self.name] for name, layer in self.layers.items()}
        try:
            if hypothesis is not None:
                kind, arg = hypothesis
                for name, layer in self.layers.items():
                    if kind == "scale":
                        layer.scaling[self.name] = saved[name] * arg
                    elif name in arg:
                        layer.scaling[self.name] = 0.0
            yield
        finally:
            for name, layer in self.layers.items():
                layer.scaling[self.name] = saved[name]

    def scale_gradient(self, traces: list, top_k: int, observed: np.ndarray) -> dict[str, float]:
        """For every adapter module m: d/ds_m of ½·Σ(observed − reference)² at s = 1, where s_m multiplies the
        module's PEFT scale and the sum runs over the compared log-probs. Positive: turning m down helps."""
        torch = self.torch
        s = {name: torch.ones((), requires_grad=True) for name in self.layers}
        saved = {name: layer.scaling[self.name] for name, layer in self.layers.items()}
        offset = 0
        try:
            for trace in traces:
                for name, layer in self.layers.items():  # a fresh graph per backward pass
                    layer.scaling[self.name] = s[name] * saved[name]
                rows, cols = _index(trace, top_k, self.vocab)
                ids = torch.tensor([trace.prompt + trace.generated[:-1]])
                logits = self.model(input_ids=ids).logits[0, len(trace.prompt) - 1:]
                r = torch.log_softmax(logits.double(), -1)[torch.from_numpy(rows), torch.from_numpy(cols)]
                f = torch.from_numpy(observed[offset:offset + len(rows)])
                offset += len(rows)
                (0.5 * ((f - r) ** 2).sum()).backward()
        finally:
            for name, layer in self.layers.items():
                layer.scaling[self.name] = saved[name]
        return {name: float(t.grad) if t.grad is not None else 0.0 for name, t in s.items()}

    def render(self, item: dict) -> Prompt:
        tok = self.tokenizer
        if "prompt" in item:
            return Prompt(tok(item["prompt"], add_special_tokens=True)["input_ids"], None)
        if not tok.chat_template:
            text = "\n".join(m["content"] for m in item["messages"])
            return Prompt(tok(text, add_special_tokens=True)["input_ids"], None)
        text = tok.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=False)
        return Prompt(tok(text, add_special_tokens=False)["input_ids"], item["messages"])

    def token_text(self, token: int) -> str:
        return repr(self.tokenizer.convert_ids_to_tokens(int(token)))


# --- llama-server ---------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One step of a llama-server run for which it returned log-probabilities."""

    pos: int  # index of the step among the generated tokens
    ids: np.ndarray  # the returned top tokens, best first (ids[0] is the GGUF's own greedy choice)
    logprobs: np.ndarray


def _utf8_complete(text: bytes) -> bool:
    """llama-server's validate_utf8 (tools/server/server-common.cpp): no multi-byte character cut off."""
    for i in range(1, min(4, len(text)) + 1):
        c = text[-i]
        if (c & 0xE0 == 0xC0 and i < 2) or (c & 0xF0 == 0xE0 and i < 3) or (c & 0xF8 == 0xF0 and i < 4):
            return False
    return True


def _align(tokens: list[int], entries: list[dict]) -> list[int]:
    """Which generated token each completion_probabilities entry belongs to.

    llama-server records a step's probabilities only when the text generated so far ends on a whole UTF-8
    character (process_token adds the step only if !incomplete), so a token that ends inside a character
    (a byte-fallback token, a byte-level BPE piece of a CJK character or an emoji) has no entry and the
    list is shorter than the tokens. The pieces' bytes come with every top_logprobs entry: replay the
    server's rule when every generated token's bytes are known, else match entries to tokens by id."""
    pieces = {int(t["id"]): bytes(t["bytes"]) for e in entries for t in e["top_logprobs"]}
    if all(t in pieces for t in tokens):
        text, pos = b"", []
        for j, t in enumerate(tokens):
            text = (text + pieces[t])[-8:]
            if _utf8_complete(text):
                pos.append(j)
        if len(pos) == len(entries) and all(tokens[j] == int(e["id"]) for j, e in zip(pos, entries)):
            return pos
    pos, j = [], 0
    for e in entries:
        while j < len(tokens) and tokens[j] != int(e["id"]):
            j += 1
        if j == len(tokens):
            raise ServerError("llama-server's log-probabilities do not follow its generated tokens",
                              f"token {e['id']} is not among {tokens}", "check the llama-server version")
        pos.append(j)
        j += 1
    return pos


def _generate(client, prompt: list[int], selection, tokens: int, n_probs: int) -> tuple[list[int], list[Step]]:
    """N greedy tokens (end-of-generation tokens suppressed) and the log-probabilities of every step."""
    doc = client.complete(prompt, adapter=selection, n_predict=tokens, n_probs=n_probs, temperature=0.0,
                          samplers=["top_k"], top_k=1, ignore_eos=True, cache_prompt=False, seed=0,
                          return_tokens=True)
    try:
        generated = [int(t) for t in doc["tokens"]]
        entries = doc.get("completion_probabilities", [])  # absent when no step was recorded
        pos = _align(generated, entries)
        steps = [Step(j, np.array([int(t["id"]) for t in e["top_logprobs"]], dtype=np.int64),
                      np.array([float(t["logprob"]) for t in e["top_logprobs"]], dtype=np.float64))
                 for j, e in zip(pos, entries)]
    except (TypeError, KeyError, ValueError):
        raise ServerError("llama-server's completion has no usable tokens and completion_probabilities",
                          f"got {str(doc)[:120]}", "check the llama-server version (the pinned build is tested)"
                          ) from None
    if not generated:
        raise ServerError("llama-server generated no token", "the context may be full", "use shorter prompts")
    return generated, steps


def _template_check(client, gguf_template: str | None, hf_template: str | None, prompts: list[Prompt],
                    ref: Reference) -> TemplateCheck:
    check = TemplateCheck(bool(gguf_template), bool(hf_template),
                          None if not (gguf_template and hf_template) else gguf_template.strip() == hf_template.strip(),
                          0, 0)
    for n, p in enumerate(prompts):
        if p.messages is None:
            continue
        check.checked += 1
        try:
            rendered = client.http.json("POST", "/apply-template", json={"messages": p.messages})["prompt"]
            ids = client.http.json("POST", "/tokenize", json={"content": rendered, "add_special": True,
                                                             "parse_special": True})["tokens"]
        except (GgufLoraError, KeyError, TypeError) as e:
            check.first_difference = check.first_difference or f"llama-server could not render it: {e}"
            continue
        if ids == p.ids:
            check.tokens_same += 1
        elif not check.first_difference:
            at = next((i for i, (a, b) in enumerate(zip(ids, p.ids)) if a != b), min(len(ids), len(p.ids)))
            theirs = ref.token_text(ids[at]) if at < len(ids) else "the end"
            ours = ref.token_text(p.ids[at]) if at < len(p.ids) else "the end"
            check.first_difference = (f"prompt {n + 1}, token {at}: llama-server has {theirs}, "
                                      f"transformers {ours}")
    return check


def _gguf_info(path: Path) -> tuple[dict[str, str], str | None, str | None, int]:
    """Tensor name -> type, general.type, chat template and vocabulary size of a GGUF."""
    try:
        f = GGUFFile(path)
    except (OSError, ValueError, IndexError) as e:
        raise InputError(f"{path} is not a readable GGUF file ({e})", "the file is damaged or truncated",
                         "convert or merge it again") from None
    get = lambda k: f.fields[k].contents() if k in f.fields else None  # noqa: E731
    tokens = get("tokenizer.ggml.tokens")
    return ({t.name: t.tensor_type.name for t in f.tensors}, get("general.type"), get("tokenizer.chat_template"),
            len(tokens) if isinstance(tokens, list) else 0)


def _bits(type_name: str) -> float:
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


# --- figures ----------------------------------------------------------------------------------------------

@dataclass
class Trace:
    """One prompt's greedy run by llama-server."""

    prompt: list[int]
    generated: list[int]
    steps: list[Step]


def _kl(ref: np.ndarray, ids: np.ndarray, lq: np.ndarray) -> tuple[float, float]:
    """KL(ref || q) over the tokens q was read for, plus the rest of both distributions as one bucket.

    Exact when ids cover the vocabulary; otherwise a lower bound (merging outcomes never raises a KL).
    Returns (kl, mass of q covered)."""
    keep = (lq > LOWEST) & (ids < ref.shape[0])
    ids, lq = ids[keep], lq[keep]
    lp = ref[ids].astype(np.float64)
    p, q = np.exp(lp), np.exp(lq)
    kl = float(np.sum(p * (lp - lq)))
    p_rest, q_rest = max(0.0, 1.0 - float(p.sum())), max(0.0, 1.0 - float(q.sum()))
    if p_rest > 1e-9:
        kl += p_rest * math.log(p_rest / max(q_rest, 1e-30))
    return max(kl, 0.0), float(q.sum())


def _top(step: Step, top_k: int, vocab: int) -> np.ndarray:
    """The top-k tokens of a llama-server step that the reference has too (the positions compared)."""
    top = step.ids[step.logprobs > LOWEST][:top_k]
    return top[top < vocab]


def _index(trace: Trace, top_k: int, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(step, token) of every compared log-probability of a run, in one fixed order."""
    tops = [_top(step, top_k, vocab) for step in trace.steps]
    rows = [np.full(len(t), step.pos) for t, step in zip(tops, trace.steps)]
    return np.concatenate([np.zeros(0), *rows]).astype(np.int64), np.concatenate([np.zeros(0), *tops]).astype(np.int64)


def _observed(traces: list[Trace], top_k: int, vocab: int) -> np.ndarray:
    """llama-server's log-probs at its top-k tokens, in _index's order."""
    out = []
    for trace in traces:
        for step in trace.steps:
            lq = dict(zip(step.ids.tolist(), step.logprobs.tolist()))
            out.append(np.array([lq[t] for t in _top(step, top_k, vocab).tolist()], dtype=np.float64))
    return np.concatenate([np.zeros(0), *out])


def _gather(traces: list[Trace], refs: list[np.ndarray], top_k: int) -> np.ndarray:
    """Reference log-probs (refs[p][j]: step j of prompt p) at a run's top-k tokens, in _index's order."""
    out = []
    for trace, ref in zip(traces, refs):
        rows, cols = _index(trace, top_k, ref.shape[1])
        out.append(ref[rows, cols].astype(np.float64))
    return np.concatenate([np.zeros(0), *out])


def _summary(diffs: np.ndarray, kls: list[float], hits: list[list[bool]]) -> Figures:
    absd = np.abs(diffs)
    return Figures(float(absd.max(initial=0.0)), float(absd.mean()) if absd.size else 0.0,
                   float(np.mean(kls)) if kls else 0.0, float(np.max(kls)) if kls else 0.0,
                   sum(sum(h) for h in hits), sum(len(h) for h in hits), sum(all(h) for h in hits), len(hits))


def _figures(traces: list[Trace], refs: list[np.ndarray], top_k: int) -> tuple[Figures, float]:
    """A llama-server run vs reference distributions on its own path. Also returns the mean probability
    mass the KL saw (1 when llama-server returned the whole vocabulary)."""
    vocab = refs[0].shape[1]
    kls, hits, mass = [], [], []
    for trace, ref in zip(traces, refs):
        hits.append([])
        for step in trace.steps:
            lp = ref[step.pos]
            kl, covered = _kl(lp, step.ids, step.logprobs)
            kls.append(kl)
            mass.append(covered)
            greedy = int(step.ids[0])  # the GGUF's own argmax (the sampled token may be an end token's runner-up)
            hits[-1].append(bool(greedy < lp.shape[0] and lp[greedy] >= lp.max() - 1e-5))
    diffs = _observed(traces, top_k, vocab) - _gather(traces, refs, top_k)
    return _summary(diffs, kls, hits), float(np.mean(mass)) if mass else 1.0


def _effect(traces: list[Trace], adapted: list[np.ndarray], bare: list[np.ndarray], top_k: int) -> Figures:
    """transformers + peft vs the bare HF base, on a run's path and its top-k tokens."""
    kls, hits = [], []
    for trace, r, b in zip(traces, adapted, bare):
        hits.append([])
        for step in trace.steps:
            rj, bj = r[step.pos].astype(np.float64), b[step.pos].astype(np.float64)
            kls.append(max(0.0, float(np.sum(np.exp(rj) * (rj - bj)))))
            hits[-1].append(int(np.argmax(rj)) == int(np.argmax(bj)))
    return _summary(_gather(traces, adapted, top_k) - _gather(traces, bare, top_k), kls, hits)


# --- verdict and diagnosis ----------------------------------------------------------------------------------

def _known_factors(adapter: PeftAdapter) -> dict[float, list[str]]:
    """Strength factors that known conversion mistakes give this adapter, and their names."""
    out: dict[float, list[str]] = {}

    def add(factor: float, why: str) -> None:
        key = next((k for k in out if abs(math.log(k / factor)) < 1e-6), factor)
        out.setdefault(key, []).append(why)

    add(2.0, "lora_b or alpha doubled")
    add(0.5, "lora_b or alpha halved")
    ranks = {p.rank for p in adapter.pairs.values()}
    alphas = {p.alpha for p in adapter.pairs.values()}
    if len(ranks) == 1 and len(alphas) == 1:
        r, a = ranks.pop(), alphas.pop()
        rslora = bool(adapter.config.get("use_rslora"))
        if rslora:
            add(1 / math.sqrt(r), f"scaled by alpha/r where this rsLoRA adapter needs alpha/sqrt(r) "
                                  f"(use_rslora ignored: 1/sqrt({r}))")
        else:
            add(math.sqrt(r), f"scaled by alpha/sqrt(r) (rsLoRA) where this adapter needs alpha/r (sqrt({r}))")
        if a > 0:
            s = a / math.sqrt(r) if rslora else a / r
            add(1 / s, f"the PEFT scale {s:g} not applied (lora_alpha ignored)")
            add(s, f"the PEFT scale {s:g} applied twice")
    return {c: why for c, why in out.items() if abs(math.log(c)) > 0.05}


def _scale_cause(c: float, adapter: PeftAdapter) -> str:
    near = [w for f, why in _known_factors(adapter).items() if abs(math.log(c / f)) < 0.1 for w in why]
    why = "; or ".join(near) if near else "check lora_alpha, use_rslora, rank_pattern / alpha_pattern"
    return f"the adapter acts {c:.3g}x as strongly as in PEFT: a scale error ({why})"


def _describe_modules(modules: list[str], all_modules: list[str]) -> str:
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if len(kinds) == 1:
        everywhere = [m for m in all_modules if m.rsplit(".", 1)[-1] == kinds[0]]
        if sorted(modules) == sorted(everywhere) and len(everywhere) > 1:
            return f"every {kinds[0]} ({len(everywhere)} modules)"
    if len(modules) <= 3:
        return ", ".join(sorted(modules))
    return f"{len(modules)} modules ({', '.join(kinds)})"


class _Diagnosis:
    """Hypotheses about a file that does not match, each run in PyTorch on the file's own greedy path and
    scored by the mean |Δ log-prob| left between the file and the hypothesis."""

    def __init__(self, ref: Reference, traces: list[Trace], top_k: int):
        self.ref, self.traces, self.top_k = ref, traces, top_k
        self.f = _observed(traces, top_k, ref.vocab)
        self.r = self._vector(None)
        self.b = self._vector("base")
        self.error = float(np.mean(np.abs(self.f - self.r)))

    def _vector(self, hypothesis) -> np.ndarray:
        return _gather(self.traces, [self.ref.logprobs(t.prompt, t.generated, hypothesis) for t in self.traces],
                       self.top_k)

    def _error_under(self, hypothesis) -> tuple[float, np.ndarray]:
        v = self._vector(hypothesis)
        return float(np.mean(np.abs(self.f - v))), v

    def scale(self, adapter: PeftAdapter) -> tuple[float, float]:
        """The adapter strength c (1 = PEFT's) that best reproduces the file, and the error left at c.

        Candidates: the least-squares fit of the file's effect on PEFT's, and the factors known mistakes
        give; the best is refined by two secant steps on the real, non-linear response."""
        d = self.r - self.b
        dd = float(d @ d)
        if dd <= 0:
            return 1.0, self.error
        candidates = {float(np.clip((self.f - self.b) @ d / dd, 1 / 64, 64)), *_known_factors(adapter)}
        tried = {1.0: (self.error, self.r)}
        for c in candidates:
            if abs(c - 1) > 1e-3:
                tried[c] = self._error_under(("scale", c))
        best = min(tried, key=lambda c: tried[c][0])
        anchor = 1.0 if best != 1.0 else None
        for _ in range(2):
            if anchor is None:
                break
            v, v0 = tried[best][1], tried[anchor][1]
            jac = (v - v0) / (best - anchor)
            jj = float(jac @ jac)
            if jj <= 0:
                break
            c = float(np.clip(best + (self.f - v) @ jac / jj, 1 / 64, 64))
            if c in tried or abs(c - best) < 1e-4 * abs(best):
                break
            tried[c] = self._error_under(("scale", c))
            best, anchor = sorted((best, c), key=lambda x: tried[x][0])
        return best, tried[best][0]

    def dropped(self, max_tries: int = 8) -> tuple[list[str], float]:
        """The adapter modules whose effect the file lacks, and the error left with them off in PEFT.

        The gradient of the squared error with respect to every module's scale (one backward pass per
        prompt) ranks the modules by how much switching each off would help; whole kinds (every v_proj)
        and the best-ranked single modules are then tried for real."""
        modules = sorted(self.ref.layers)
        grad = self.ref.scale_gradient(self.traces, self.top_k, self.f)
        kinds: dict[str, list[str]] = {}
        for m in modules:
            kinds.setdefault(m.rsplit(".", 1)[-1], []).append(m)
        best: tuple[float, list[str]] = (self.error, [])
        ranked_kinds = sorted(kinds, key=lambda k: -sum(grad[m] for m in kinds[k]))
        for kind in ranked_kinds[:2]:
            if sum(grad[m] for m in kinds[kind]) > 0:
                best = min(best, (self._error_under(("drop", frozenset(kinds[kind])))[0], kinds[kind]))
        off, err = [], self.error
        for m in [m for m in sorted(modules, key=lambda m: -grad[m]) if grad[m] > 0][:max_tries]:
            e = self._error_under(("drop", frozenset(off + [m])))[0]
            if e > 0.9 * err:
                break
            off, err = off + [m], e
        best = min(best, (err, off))
        return best[1], best[0]


def _verdict(report: FileReport, diag: _Diagnosis, adapter: PeftAdapter, modules: list[str]) -> None:
    """Set report.verdict and report.cause (and the fitted scale / dropped modules)."""
    e, d = report.error.mean_dlogprob, report.effect.mean_dlogprob
    floor, qfloor = report.floor.mean_dlogprob, report.precision_floor

    def within(fl: float) -> bool:
        return e <= MATCH_FLOOR * fl + MATCH_EFFECT * d + MATCH_ABS

    pct = f"{100 * report.ratio_effect:.2g}% of the adapter's effect"
    if within(floor):
        report.verdict = "matches"
        report.cause = (f"error {_times(report.ratio_floor)} the floor and {pct}: what the base GGUF and the "
                        "file's own precision explain")
        return
    c, e_scale = diag.scale(adapter)
    off, e_drop = diag.dropped()
    report.scale_factor = round(c, 4)
    scale_ok = abs(math.log(c)) > MIN_SCALE_ERROR and e_scale <= EXPLAINED * e
    drop_ok = bool(off) and e_drop <= EXPLAINED * e
    if scale_ok and (not drop_ok or e_scale <= e_drop):
        report.verdict = "wrong"
        report.cause = f"{_scale_cause(c, adapter)}; at {c:.3g}x the error falls from {e:.3g} to {e_scale:.3g}"
        return
    if drop_ok:
        report.dropped = off
        report.verdict = "wrong"
        report.cause = (f"no effect from {_describe_modules(off, modules)}: the file lacks those targets "
                        f"(with them off in PEFT the error falls from {e:.3g} to {e_drop:.3g})")
        return
    unexplained = "no scale error or missing module explains it"
    if report.lossy and qfloor is not None:
        q = qfloor.mean_dlogprob
        if within(q):
            report.verdict = "quantization noise"
            report.cause = (f"error {_times(e / q)} the floor of {report.precision_floor_of} ({q:.2g}), "
                            f"{pct}; {unexplained}")
        else:
            report.verdict = "wrong"
            report.cause = (f"error {_times(e / q)} the floor of {report.precision_floor_of} ({q:.2g}), "
                            f"{pct}, and {unexplained}: a wrong tensor layout or another base")
        return
    if report.lossy and e <= MATCH_FLOOR * floor + LORA_NOISE * d + MATCH_ABS:
        report.verdict = "quantization noise"
        report.cause = (f"error {_times(report.ratio_floor)} the floor, {pct} (the file's own rounding); "
                        f"{unexplained}")
        return
    report.verdict = "wrong"
    report.cause = (f"error {_times(report.ratio_floor)} the floor, {pct}, and {unexplained}: a wrong tensor layout, "
                    "another base" + (", or rounding too coarse for this adapter" if report.lossy else ""))


# --- the whole run ----------------------------------------------------------------------------------------------

def _hf_base_for(adapter: PeftAdapter, hf_base: str | Path | None) -> Path:
    if hf_base is None:
        hint = adapter.config.get("base_model_name_or_path")
        if not hint or not Path(hint).expanduser().is_dir():
            said = f" (its base_model_name_or_path {hint!r} is not a local folder)" if hint else ""
            raise InputError(f"No Hugging Face base for {adapter.path}{said}",
                             "verify runs the adapter in transformers + peft as the reference",
                             "pass --hf-base HF_MODEL_FOLDER (the model the adapter was trained on)")
        hf_base = Path(hint).expanduser()
    hf_base = Path(hf_base)
    if not (hf_base / "config.json").is_file():
        raise InputError(f"Hugging Face base {hf_base} is not there", "it has no config.json" if hf_base.is_dir()
                         else "no such folder", "pass --hf-base with the folder holding config.json and the weights")
    return hf_base


def _outtype_of(path: Path) -> str | None:
    """The merge / llama-quantize output type a model GGUF was written as (general.file_type), if known."""
    from .typerules import OUTTYPES

    f = GGUFFile(path)
    ftype = f.fields["general.file_type"].contents() if "general.file_type" in f.fields else None
    return next((name for name, (ft, _) in OUTTYPES.items() if int(ft) == ftype), None)


class _Servers:
    """Starts llama-server for one model at a time with verify's exact settings. Each keeps its log in a
    temporary folder of its own, left in place when it fails to start (the error names it)."""

    def __init__(self, binary, args: list[str]):
        self.binary, self.args = binary, args

    @contextmanager
    def run(self, model: Path, loras: list[Path] = ()):
        from .runtime.llama_server import ManagedServer

        server = ManagedServer(model, list(loras), llama_server=self.binary, extra_args=self.args,
                               ready_timeout=600.0)
        try:
            yield server.start()
        finally:
            server.close()


def verify(adapter: str | Path, base: str | Path, files: list[str | Path] = (), *, hf_base: str | Path | None = None,
           prompts: str | Path | list[dict] | None = None, tokens: int = 32, top_k: int = 10,
           n_probs: int | None = None, dtype: str = "float32", llama_server: str | Path | None = None,
           server_args: list[str] = (), progress: Progress | None = None) -> VerifyReport:
    """Check GGUF LoRA files (run on `base`) and merged GGUFs against the PEFT adapter in transformers + peft.

    files empty: the adapter is converted (f16, to a temporary file) and that file is checked.
    prompts: a file (see read_prompts), a list of {"messages": [...]} / {"prompt": str}, or None for the
    default chat prompts. dtype: "float32", or "auto" for the checkpoint's own dtype."""
    say = progress or (lambda msg: None)
    if tokens < 1 or top_k < 1:
        raise InputError("Tokens and top-k must be at least 1", f"got {tokens} and {top_k}", "")
    if dtype not in ("float32", "auto"):
        raise InputError(f"Unknown dtype {dtype!r}", "", "use float32 or auto (the checkpoint's own dtype)")
    _import_torch_stack()
    peft = load_adapter(adapter)
    hf_dir = _hf_base_for(peft, hf_base)
    base = Path(base)
    if not base.is_file():
        raise InputError(f"Base GGUF {base} does not exist", "", "pass the base model GGUF with --base")
    model = read_gguf_base(base)
    base_types, _, base_template, gguf_vocab = _gguf_info(base)
    items = (read_prompts(prompts) if isinstance(prompts, (str, Path)) else
             [{"messages": [{"role": "user", "content": p}]} for p in DEFAULT_PROMPTS] if prompts is None
             else list(prompts))

    checked: list[tuple[Path, str]] = []
    for f in map(Path, files):
        if not f.is_file():
            raise InputError(f"{f} does not exist", "", "pass GGUF LoRA files or merged GGUF models")
        if _gguf_info(f)[1] == "adapter":
            checked.append((f, "lora"))
            continue
        other = read_gguf_base(f)
        if other.arch.name != model.arch.name:
            raise InputError(f"{f} is a {other.arch.name} model, base {base} is {model.arch.name}", "",
                             "pass merged files of this adapter's base")
        checked.append((f, "merged"))

    with tempfile.TemporaryDirectory(prefix="gguf-lora-verify-") as tmp_name:
        tmp = Path(tmp_name)
        if not checked:
            from .convert import convert

            say(f"converting {peft.path.name} for {base.name}")
            out = convert(peft.path, base, tmp / f"{peft.path.name}-f16.gguf", outtype="f16")
            checked.append((Path(out.output), "converted"))

        say(f"loading {hf_dir} + {peft.path.name} in transformers + peft")
        ref = Reference(hf_dir, peft.path, dtype)
        rendered = [ref.render(item) for item in items]
        vocab = min(ref.vocab, gguf_vocab) if gguf_vocab else ref.vocab
        n_probs = n_probs or (vocab if vocab <= MAX_PROBS else MAX_PROBS)
        longest = max(len(p.ids) for p in rendered)
        ctx = max(512, -(-(longest + tokens + 16) // 256) * 256)
        servers = _Servers(llama_server, EXACT_ARGS + ["-c", str(ctx)] + list(server_args))
        hf_template = ref.tokenizer.chat_template if isinstance(ref.tokenizer.chat_template, str) else None

        def run(client, selection) -> list[Trace]:
            return [Trace(p.ids, *_generate(client, p.ids, selection, tokens, n_probs)) for p in rendered]

        reports: dict[int, FileReport] = {}
        runs: dict[int, list[Trace]] = {}
        templates: dict[int, TemplateCheck] = {}
        # One server for the base and every LoRA file, linked under unique names (llama-server and our client
        # address adapters by file name); each request names every adapter's scale. A file llama-server
        # refuses is reported and left out.
        links = tmp / "loras"
        links.mkdir()
        pending = [(i, f) for i, (f, kind) in enumerate(checked) if kind != "merged"]
        for i, f in pending:
            (links / f"{i}.gguf").symlink_to(f.resolve())
        while True:
            say(f"llama-server: {base.name}" + (f" + {len(pending)} LoRA file(s)" if pending else ""))
            try:
                with servers.run(base, [links / f"{i}.gguf" for i, _ in pending]) as client:
                    floor_runs = run(client, {})
                    base_check = _template_check(client, base_template, hf_template, rendered, ref)
                    for n, (i, f) in enumerate(pending):
                        say(f"running {f.name}")
                        runs[i] = run(client, {n: 1.0})
                        templates[i] = base_check
                break
            except ServerError as e:
                refused = next(((i, f) for i, f in pending if str(links / f"{i}.gguf") in e.what), None)
                if refused is None:
                    raise
                reports[refused[0]] = FileReport(str(refused[1]), checked[refused[0]][1], "wrong",
                                                 f"llama-server refused it: {e.why}")
                pending.remove(refused)

        notes: list[str] = []
        qfloors: dict[str, tuple[list[Trace], str]] = {}  # output type -> run of the base quantized so
        lossy: dict[int, bool] = {}
        for i, (f, kind) in enumerate(checked):
            types = _gguf_info(f)[0]
            if kind == "merged":
                lossy[i] = any(_bits(t) < _bits(base_types.get(name, "F32")) for name, t in types.items())
            else:
                lossy[i] = any(t != "F32" for t in types.values())
            if kind != "merged" or i in reports:
                continue
            say(f"llama-server: {f.name}")
            try:
                with servers.run(f) as client:
                    runs[i] = run(client, {})
                    templates[i] = _template_check(client, _gguf_info(f)[2], hf_template, rendered, ref)
            except ServerError as e:
                reports[i] = FileReport(str(f), kind, "wrong", f"llama-server could not run it: {e.why}")
                continue
            outtype = _outtype_of(f)
            if lossy[i] and outtype and outtype not in qfloors:
                # The floor at the file's precision: the bare base quantized the same way, vs the bare HF base.
                say(f"quantizing {base.name} to {outtype} (the floor at {f.name}'s precision)")
                try:
                    quantized = _quantize(base, tmp / f"floor-{outtype}.gguf", outtype, llama_server)
                    with servers.run(quantized) as client:
                        qfloors[outtype] = (run(client, {}), f"{base.name} quantized to {outtype}")
                    quantized.unlink()
                except GgufLoraError as e:  # judged without it (see _verdict), and said so
                    notes.append(f"no floor at {outtype} precision: {e}")

        say("comparing with transformers + peft")
        bare_of = lambda traces: [ref.logprobs(t.prompt, t.generated, "base") for t in traces]  # noqa: E731
        floor, mass = _figures(floor_runs, bare_of(floor_runs), top_k)
        if not floor.steps:
            raise ServerError("llama-server returned no log-probabilities for any step", "every generated token "
                              "ended inside a UTF-8 character", "use other prompts (--prompts) or more --tokens")
        qfloor_figures = {k: (_figures(traces, bare_of(traces), top_k)[0], name)
                          for k, (traces, name) in qfloors.items()}
        modules = sorted(ref.layers)
        for i, (f, kind) in enumerate(checked):
            if i in reports:
                continue
            traces = runs[i]
            adapted = [ref.logprobs(t.prompt, t.generated) for t in traces]
            error, _ = _figures(traces, adapted, top_k)
            effect = _effect(traces, adapted, bare_of(traces), top_k)
            counts: dict[str, int] = {}
            for t in _gguf_info(f)[0].values():
                counts[t] = counts.get(t, 0) + 1
            qf = qfloor_figures.get(_outtype_of(f)) if kind == "merged" and lossy[i] else None
            report = FileReport(str(peft.path if kind == "converted" else f), kind, "", "", error, effect, floor,
                                _ratio(error.mean_dlogprob, floor.mean_dlogprob),
                                _ratio(error.mean_dlogprob, effect.mean_dlogprob), counts, lossy[i],
                                precision_floor=qf[0] if qf else None, precision_floor_of=qf[1] if qf else "",
                                template=templates.get(i))
            say(f"verdict for {f.name}")
            _verdict(report, _Diagnosis(ref, traces, top_k), peft, modules)
            reports[i] = report

    if not base_check.ok and base_check.hf_has:
        notes.append("chat template: " + base_check.note())
    if any(r.effect and r.effect.mean_dlogprob <= MATCH_FLOOR * floor.mean_dlogprob for r in reports.values()):
        notes.append("the adapter barely moves the base (its effect is within the floor): a file that drops it "
                        "would pass too")
    if n_probs < vocab:
        notes.append(f"KL over the top {n_probs} of {vocab} tokens plus the rest as one bucket: a lower bound "
                        f"(those tokens hold {100 * mass:.3g}% of the mass on average)")
    return VerifyReport(str(peft.path), str(hf_dir), str(base), ref.dtype, len(rendered), tokens, top_k, n_probs,
                        vocab, n_probs >= vocab, any(p.messages for p in rendered), floor, base_check,
                        [reports[i] for i in range(len(checked))], notes)


def _quantize(base: Path, out: Path, outtype: str, llama_server) -> Path:
    """The base quantized as a merge of that type would be: by llama-quantize when it is beside llama-server
    (fast, and llama.cpp's own), else by gguf-lora's quantize (the same bytes, tested tensor by tensor)."""
    from .llama_cpp import find_tool

    try:
        server = find_tool("llama-server", llama_server)
        tool = server.parent / "llama-quantize"
        if not tool.is_file():
            tool = find_tool("llama-quantize")
    except InputError:
        tool = None
    if tool is not None:
        proc = subprocess.run([str(tool), str(base), str(out), outtype.upper()], capture_output=True, text=True,
                              errors="replace")
        if proc.returncode == 0:
            return out
    from .merge import quantize

    return Path(quantize(base, out, outtype).output)


def _times(x: float) -> str:
    return f"{x:.0f}x" if x >= 100 else f"{x:.2g}x"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else math.inf)


def render_report(report: VerifyReport) -> str:
    """The report as the CLI prints it: one table row per file, its effect and floor, the cause, warnings."""
    rows: list[tuple[str, Figures | None, str] | str] = [(f"floor: {Path(report.base).name}", report.floor, "")]
    for f in report.files:
        name = f"{Path(report.adapter).name} (converted, f16)" if f.kind == "converted" else Path(f.path).name
        rows.append((name, f.error, f.verdict))
        if f.effect is not None:
            rows.append(("  adapter's effect", f.effect, ""))
        if f.precision_floor is not None:
            rows.append((f"  floor at {f.precision_floor_of.rsplit(' ', 1)[-1]}", f.precision_floor, ""))
        rows.append(f"  {f.cause}")
        if f.template is not None and f.template != report.template and not f.template.ok:
            rows.append(f"  chat template: {f.template.note()}")
    width = max(len(r[0]) for r in rows if isinstance(r, tuple)) + 2

    def line(label: str, cells: list[str], verdict: str) -> str:
        return (f"{label:<{width}}" + "".join(f"{c:>9}" for c in cells) + f"   {verdict}").rstrip()

    kl = (f"KL over the whole vocabulary ({report.vocab})" if report.kl_exact else
          f"KL over the top {report.n_probs} of {report.vocab} tokens + the rest (a lower bound)")
    out = [f"{report.adapter} in transformers + peft ({report.dtype}, {report.hf_base}) vs llama-server "
           f"(base {Path(report.base).name})",
           f"{report.prompts} {'chat ' if report.chat else ''}prompts x {report.tokens} greedy tokens; |Δ log-prob| "
           f"over each step's top {report.top_k}; {kl}",
           f"chat template: {report.template.note()}", "",
           line("", ["max|Δ|", "mean|Δ|", "KL", "greedy"], "verdict")]
    for r in rows:
        if isinstance(r, str):
            out.append(r)
        elif r[1] is None:
            out.append(line(r[0], ["-"] * 4, r[2]))
        else:
            fig = r[1]
            out.append(line(r[0], [f"{fig.max_dlogprob:.2g}", f"{fig.mean_dlogprob:.2g}", f"{fig.kl:.2g}",
                                   f"{fig.greedy_agree}/{fig.steps}"], r[2]))
    out += [f"warning: {w}" for w in report.warnings]
    counts = {v: sum(f.verdict == v for f in report.files) for v in ("matches", "quantization noise", "wrong")}
    out.append(f"{counts['matches']} of {len(report.files)} files match" +
               "".join(f", {n} {v}" for v, n in counts.items() if n and v != "matches"))
    return "\n".join(out)
