"""Choosing the next token inside a captured decode step: greedy or sampled, with transformers' repetition
penalty, temperature, top-k and top-p.

The settings live in small static tensors, so one captured graph serves every value a user picks; only greedy vs
sampling are different graphs. The processors follow transformers' order and semantics (penalty, temperature,
top-k, top-p on the top-k survivors), and sampling draws with the exponential-race form of `multinomial`
(argmax of p / Exp(1)), which needs no host synchronisation and uses torch's generator (graph-safe, seedable).
"""

from __future__ import annotations

import torch


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
        self.ranks = torch.arange(vocab_size, device=device)[None]

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
        logits = logits.float()
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        logits = torch.where(self.seen, penalised, logits)
        if sample:
            ordered, order = (logits / self.temperature).sort(dim=-1, descending=True)
            ordered = ordered.masked_fill(self.ranks >= self.top_k, -torch.inf)
            probs = ordered.softmax(-1)
            # keep a token while the mass ranked above it is below top_p (the first one always)
            ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= self.top_p, -torch.inf)
            race = ordered.softmax(-1) / torch.empty_like(ordered).exponential_()
            token = order.gather(-1, race.argmax(-1, keepdim=True))
        else:
            token = logits.argmax(-1, keepdim=True)
        self.seen.scatter_(1, token, True)
        return token
