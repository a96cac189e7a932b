"""The ``reference`` judge template: the reference code's minimal prompt, in our words.

The reference judge got a system message naming the criterion and asking for a 1-10 integer as
JSON under ``score``, and a user message with the prompt and the completion in triple quotes; its
criteria were one plain sentence per task and one for coherence. No rubric, no instructions about
grammar or truncated text. Only this template (with gpt-4o-mini) is comparable with the paper's
table; :func:`saets_utils.evaluation.scoring.compare_with_published` checks that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from saets_utils.judges.base import CriterionKind, JudgeRequest

# Part of every cache key of a request judged with this template (bump when it changes).
REFERENCE_TEMPLATE_VERSION = "reference-v1"

SYSTEM_TEMPLATE = (
    "You rate texts written by a language model against this criterion:\n{criterion}\n"
    "Give a score from 1 to 10. The model was given a prompt and wrote the text below; rate the "
    'text on the criterion. Reply in JSON with one field, "score" (an integer).'
)
PROMPT_PART = "Prompt:\n\n{prompt}\n\n"  # left out when the prompt is empty
USER_TEMPLATE = 'Completion:\n"""\n{text}\n"""\n'

# One plain sentence per reference task (our wording of the reference's criteria).
REFERENCE_BEHAVIOUR: dict[str, str] = {
    "anger": "The text uses angry words or expresses anger.",
    "christian": "The text talks about Christianity and speaks well of it.",
    "conspiracy": "The text suggests belief in a conspiracy theory.",
    "french": "The text is written in French or uses French words.",
    "london": "The text mentions London or something to do with London.",
    "love": "The text talks about love or expresses loving feelings.",
    "praise": "The text praises someone or something.",
    "want_to_die": "The text suggests that someone wants to die.",
    "wedding": "The text talks about a wedding.",
}
REFERENCE_COHERENCE = "The text is coherent and grammatically correct."


def reference_criteria(task: str, fallback: str) -> tuple[tuple[CriterionKind, str], tuple[CriterionKind, str]]:
    """(behaviour, coherence) criteria of ``task`` in the reference style; a task the reference did
    not have keeps its own behaviour criterion (``fallback``)."""
    return (("behaviour", REFERENCE_BEHAVIOUR.get(task, fallback)), ("coherence", REFERENCE_COHERENCE))


def reference_messages(req: JudgeRequest) -> list[dict[str, str]]:
    """Chat messages of the reference template for ``req`` (criterion already in the reference style)."""
    system = SYSTEM_TEMPLATE.format(criterion=req.criterion)
    user = (PROMPT_PART.format(prompt=req.prompt) if req.prompt else "") + USER_TEMPLATE.format(text=req.text)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
