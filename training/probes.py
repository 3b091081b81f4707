"""Linear probes that teach the bundled tiny models to compare horizontal positions and to count (training only).

A position question ("Is the red square left or right of the blue circle ?") needs the two objects' positions to
meet at the answer. The attention teachers route them there (each naming word gathers its object's visual tokens,
the answer reads the two naming words in two heads), but the answer word alone never taught the model in what form
to carry a position: trained that way the bundled LLaVA answered position questions below chance. Two linear
regressions on the residual stream fix the form:

* after the noun layer, the last naming word of a phrase that names exactly one object predicts that object's
  horizontal centre (scaled to [-1, 1]);
* after the answer layer, the token that predicts a position answer predicts the difference of the two objects'
  scaled centres (first minus second), whose sign is the answer.

Linear features survive the attention averages that move them from cell to word to answer, so the comparison the
language model still has to learn is a sign.

Counting has the same problem in another form: a naming word that attends only to the centre cells of the N
counted objects averages N alike vectors, the same vector for every N. The count teacher therefore lets the word
also attend to the first token of the sequence (a sink, see `train.attention_targets`), so that the share left on
the sink falls with N, and two more regressions ask for N itself (scaled, N / 2 - 1): on the naming word after the
noun layer and on the token that predicts a count answer after the answer layer.

Optionally (`answer_words > 0`), two more linear read-outs classify the answer word itself: on the naming word of
every one-phrase question after the noun layer, and on the token that predicts any answer after the answer layer.
They give the value path of the noun head a direct target where the answer loss alone may not find one: trained
without them the OneVision model attended to the right cells but carried no colour or shape from them (a linear
probe on its naming words read the asked colour at chance, against 82 % for the bundled Qwen2.5-VL model), and it
answered every colour question "yellow".

The probes are discarded; the shipped model is the plain HF class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def _no_rows() -> torch.Tensor:
    return torch.zeros(0, 2, dtype=torch.long)


def _no_ids() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


@dataclass
class ProbeTargets:
    """Rows are (sample, position) pairs of one batch; values are scaled positions, counts or answer-token ids."""

    noun_rows: torch.Tensor  # [M, 2] long: last naming word of a one-object phrase
    noun_x: torch.Tensor  # [M] float: that object's centre, 2 * x - 1
    answer_rows: torch.Tensor  # [K, 2] long: the token predicting a position answer
    answer_dx: torch.Tensor  # [K] float: (2 * x1 - 1) - (2 * x2 - 1)
    count_noun_rows: torch.Tensor  # [C, 2] long: the naming word of a count question
    count_answer_rows: torch.Tensor  # [C, 2] long: the token predicting its answer
    count: torch.Tensor  # [C] float: how many, N / 2 - 1
    word_noun_rows: torch.Tensor = field(default_factory=_no_rows)  # [W, 2]: naming word of a one-phrase question
    word_noun_ids: torch.Tensor = field(default_factory=_no_ids)  # [W] long: token id of that question's answer
    word_answer_rows: torch.Tensor = field(default_factory=_no_rows)  # [V, 2]: the token predicting an answer
    word_answer_ids: torch.Tensor = field(default_factory=_no_ids)  # [V] long: token id of that answer


class LayerTap:
    """Keeps the output hidden states [B, S, D] of one decoder layer of the language model (a forward hook)."""

    def __init__(self, model, layer: int) -> None:
        self.hidden: torch.Tensor | None = None
        module = model.model.language_model.layers[layer]
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.hidden = output[0] if isinstance(output, tuple) else output

    def remove(self) -> None:
        self.handle.remove()


class ReadoutProbes(torch.nn.Module):
    """The four regressions above, reading decoder layers `noun_layer` and `answer_layer` of `model`, and with
    `answer_words` > 0 the two answer-word classifiers over that many token ids (the vocabulary size)."""

    def __init__(self, model, noun_layer: int, answer_layer: int, answer_words: int = 0) -> None:
        super().__init__()
        dim = model.config.get_text_config().hidden_size
        self.noun_word = torch.nn.Linear(dim, answer_words) if answer_words else None
        self.answer_word = torch.nn.Linear(dim, answer_words) if answer_words else None
        self.noun = torch.nn.Linear(dim, 1)
        self.answer = torch.nn.Linear(dim, 1)
        self.noun_count = torch.nn.Linear(dim, 1)
        self.answer_count = torch.nn.Linear(dim, 1)
        self._taps = (LayerTap(model, noun_layer), LayerTap(model, answer_layer))

    def loss(self, targets: ProbeTargets) -> torch.Tensor:
        """Sum of the four mean squared errors on the last forward (a term is 0 when the batch has no row for it)."""
        total = torch.zeros(())
        pairs = (
            (self.noun, self._taps[0], targets.noun_rows, targets.noun_x),
            (self.answer, self._taps[1], targets.answer_rows, targets.answer_dx),
            (self.noun_count, self._taps[0], targets.count_noun_rows, targets.count),
            (self.answer_count, self._taps[1], targets.count_answer_rows, targets.count),
        )
        for head, tap, rows, value in pairs:
            if rows.numel():
                read = head(tap.hidden[rows[:, 0], rows[:, 1]].float()).squeeze(-1)
                total = total + torch.nn.functional.mse_loss(read, value)
        return total

    def word_loss(self, targets: ProbeTargets) -> torch.Tensor:
        """Sum of the two answer-word cross-entropies (mean over rows) on the last forward; 0 without rows."""
        if self.noun_word is None or self.answer_word is None:
            raise ValueError("these probes have no answer-word classifiers (built with answer_words=0)")
        total = torch.zeros(())
        pairs = (
            (self.noun_word, self._taps[0], targets.word_noun_rows, targets.word_noun_ids),
            (self.answer_word, self._taps[1], targets.word_answer_rows, targets.word_answer_ids),
        )
        for head, tap, rows, ids in pairs:
            if rows.numel():
                logits = head(tap.hidden[rows[:, 0], rows[:, 1]].float())
                total = total + torch.nn.functional.cross_entropy(logits, ids)
        return total

    def remove(self) -> None:
        for tap in self._taps:
            tap.remove()


def probe_targets(turns, answer_id: Callable[[str], int] | None = None) -> ProbeTargets:
    """Targets from `train.named_turns` tuples (sample, answer position, question, naming positions, phrases);
    with `answer_id` (answer word -> token id) also those of the answer-word classifiers."""
    noun_rows, noun_x, answer_rows, answer_dx = [], [], [], []
    count_nouns, count_answers, count = [], [], []
    word_nouns, noun_ids, word_answers, answer_ids = [], [], [], []
    for b, pos, question, ends, phrases in turns:
        if answer_id is not None:
            word = answer_id(question.answer)
            word_answers.append((b, pos))
            answer_ids.append(word)
            if len(phrases) == 1 and ends:
                word_nouns.append((b, ends[0]))
                noun_ids.append(word)
        if question.category == "count" and ends:
            count_nouns.append((b, ends[0]))
            count_answers.append((b, pos))
            count.append(len(phrases[0]) / 2 - 1)
        single = [things[0] if len(things) == 1 and hasattr(things[0], "shape") else None for things in phrases]
        for noun, obj in zip(ends, single):
            if obj is not None:
                noun_rows.append((b, noun))
                noun_x.append(2 * obj.x - 1)
        if question.category == "position" and len(ends) == 2 and all(o is not None for o in single):
            answer_rows.append((b, pos))
            answer_dx.append(2 * (single[0].x - single[1].x))
    return ProbeTargets(
        torch.tensor(noun_rows, dtype=torch.long).reshape(-1, 2),
        torch.tensor(noun_x, dtype=torch.float32),
        torch.tensor(answer_rows, dtype=torch.long).reshape(-1, 2),
        torch.tensor(answer_dx, dtype=torch.float32),
        torch.tensor(count_nouns, dtype=torch.long).reshape(-1, 2),
        torch.tensor(count_answers, dtype=torch.long).reshape(-1, 2),
        torch.tensor(count, dtype=torch.float32),
        torch.tensor(word_nouns, dtype=torch.long).reshape(-1, 2),
        torch.tensor(noun_ids, dtype=torch.long),
        torch.tensor(word_answers, dtype=torch.long).reshape(-1, 2),
        torch.tensor(answer_ids, dtype=torch.long),
    )
