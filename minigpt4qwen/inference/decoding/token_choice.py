"""Choosing the next token inside a captured decode step: greedy or sampled, with transformers' repetition
penalty, temperature, top-k and top-p.

The settings live in small static tensors, so one captured graph serves every value a user picks; only greedy vs
sampling are different graphs. The processors follow transformers' order and semantics (penalty, temperature,
top-k, top-p on the top-k survivors). Two choosers share them:
- `TokenChooser` (one conversation, `GraphDecoder`) draws with the exponential-race form of `multinomial`
  (argmax of p / Exp(1)) from torch's generator (graph-safe, seeded with `torch.manual_seed`);
- `RowChooser` (one row per slot of the batched scheduler) keeps every setting per row and draws by inverse CDF
  from a counter-based uniform keyed by (the request's seed, its token count): a request's draws never depend on
  which other requests share the batch, or on how many tokens they drew.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _penalised(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty on the `seen` tokens ([R, V] float logits, [R, 1] penalty)."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p: the sorted (descending) warped logits, -inf where cut, and the sort order."""
    ordered, order = (logits / temperature).sort(dim=-1, descending=True, stable=True)
    # Tokens tied with the k-th stay, as transformers' top-k keeps them (ties are common among bf16 logits).
    ordered = ordered.masked_fill(ordered < ordered.gather(-1, top_k - 1), -torch.inf)
    probs = ordered.softmax(-1)
    # keep a token while the mass ranked above it is below top_p (the first one always)
    return ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, -torch.inf), order


def _times(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x < 2**32 in int64, without overflowing int64 (16-bit halves)."""
    low = (x & 0xFFFF) * constant
    high = (((x >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (the "lowbias32" constants) on int64 tensors below 2**32."""
    x = x ^ (x >> 16)
    x = _times(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _times(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A uniform in (0, 1) per row that depends only on (key, counter): [R, 2] int64 key words below 2**32 and
    [R, 1] int64 counter -> [R, 1] float32 (24 random bits)."""
    h = _mix(key[:, 1:2] ^ _mix(key[:, :1] ^ _mix((counter & _MASK32) ^ 0x9E3779B9)))
    return ((h >> 8).float() + 0.5) * 2.0**-24


def seed_words(seed: int) -> tuple[int, int]:
    """A seed in [0, 2**63) as the two 32-bit key words of `counter_uniform`."""
    return seed & _MASK32, (seed >> 32) & _MASK32


class TokenChooser:
    """The next-token rule of one decoder, with its settings and the tokens generated so far (for the penalty).

    Args:
        vocab_size: the LM head's output size.
        device: where the logits are.
    """

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.temperature = torch.ones(1, 1, device=device)
        self.top_p = torch.ones(1, 1, device=device)
        self.top_k = torch.full((1, 1), vocab_size, dtype=torch.long, device=device)
        self.penalty = torch.ones(1, 1, device=device)
        self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)  # generated so far

    def configure(self, *, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                  repetition_penalty: float = 1.0) -> None:
        """Sets the values the next steps use (eagerly, outside any graph).

        Args:
            temperature: > 0; divides the logits when sampling.
            top_p: in (0, 1]; nucleus sampling.
            top_k: 0 (off) or the number of most likely tokens kept when sampling.
            repetition_penalty: > 0; applied to every generated token's logit (as transformers does when
                generating from embeddings: the prompt is not penalised).
        """
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        self.top_k.fill_(min(top_k, self.vocab_size) if top_k > 0 else self.vocab_size)
        self.penalty.fill_(repetition_penalty)

    def reset(self) -> None:
        """Forgets the generated tokens (a new reply starts)."""
        self.seen.zero_()

    def __call__(self, logits: torch.Tensor, sample: bool) -> torch.Tensor:
        """[1, V] logits -> [1, 1] chosen token (recorded for the penalty)."""
        logits = _penalised(logits.float(), self.seen, self.penalty)
        if sample:
            ordered, order = _nucleus(logits, self.temperature, self.top_k, self.top_p)
            race = ordered.softmax(-1) / torch.empty_like(ordered).exponential_()
            token = order.gather(-1, race.argmax(-1, keepdim=True))
        else:
            token = logits.argmax(-1, keepdim=True)
        self.seen.scatter_(1, token, True)
        return token


class RowChooser:
    """The next-token rule of every slot of a batched decoder: per-row settings, seeds, token counts and penalty
    memory, in static tensors indexed by slot.

    Args:
        rows: the number of slots (rows of state).
        vocab_size: the LM head's output size.
        device: where the logits are.
    """

    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.sample = torch.zeros(rows, 1, dtype=torch.bool, device=device)
        self.temperature = torch.ones(rows, 1, device=device)
        self.top_p = torch.ones(rows, 1, device=device)
        self.top_k = torch.full((rows, 1), vocab_size, dtype=torch.long, device=device)
        self.penalty = torch.ones(rows, 1, device=device)
        self.key = torch.zeros(rows, 2, dtype=torch.long, device=device)  # the seed's two 32-bit words
        self.count = torch.zeros(rows, 1, dtype=torch.long, device=device)  # tokens chosen so far
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        self._state = ("sample", "temperature", "top_p", "top_k", "penalty", "key", "count", "seen")

    def configure(self, row: int, *, sample: bool, seed: int, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = 0, repetition_penalty: float = 1.0) -> None:
        """Starts a new reply in `row` (eagerly, outside any graph): its settings (as `TokenChooser.configure`),
        its seed in [0, 2**63), no tokens chosen yet."""
        # Fills, not `tensor[row] = value`: that copies from pageable host memory, waiting for the queued steps.
        self.sample[row].fill_(sample)
        self.temperature[row].fill_(temperature)
        self.top_p[row].fill_(top_p)
        self.top_k[row].fill_(min(top_k, self.vocab_size) if top_k > 0 else self.vocab_size)
        self.penalty[row].fill_(repetition_penalty)
        for word, value in enumerate(seed_words(seed)):
            self.key[row, word].fill_(value)
        self.count[row].fill_(0)
        self.seen[row].fill_(False)

    def move(self, source: int, target: int) -> None:
        """Copies row `source`'s whole state to row `target` (eagerly)."""
        for name in self._state:
            state = getattr(self, name)
            state[target] = state[source]

    def __call__(self, logits: torch.Tensor, rows: torch.Tensor, sample: bool, commit: torch.Tensor) -> torch.Tensor:
        """[R, V] logits of slots `rows` [R] -> [R, 1] chosen tokens; rows where `commit` [R] is False leave their
        state (token count, penalty memory) untouched. `sample=False` serves batches without sampling rows."""
        logits = _penalised(logits.float(), self.seen[rows], self.penalty[rows])
        token = logits.argmax(-1, keepdim=True)
        if sample:
            ordered, order = _nucleus(logits, self.temperature[rows], self.top_k[rows], self.top_p[rows])
            cdf = ordered.softmax(-1).cumsum(-1)
            target = counter_uniform(self.key[rows], self.count[rows]) * cdf[:, -1:]
            drawn = torch.searchsorted(cdf, target, right=True).clamp_(max=self.vocab_size - 1)
            token = torch.where(self.sample[rows], order.gather(-1, drawn), token)
        flat = token[:, 0]
        self.seen[rows, flat] = self.seen[rows, flat] | commit
        self.count[rows] = self.count[rows] + commit[:, None].long()
        return token
