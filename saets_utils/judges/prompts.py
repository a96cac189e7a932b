"""What the LLM judge is asked: the system prompt, one template per criterion kind, the coherence
criterion shared by all tasks, and the version that enters every cache key."""

from __future__ import annotations

# Bump when a template or the request settings change: it is part of every cache key.
PROMPT_TEMPLATE_VERSION = "judge-v1"

SYSTEM_PROMPT = (
    "You rate short texts written by a language model. You answer with one JSON object of the "
    'form {"score": N}, where N is a whole number from 1 to 10, and with nothing else.'
)
BEHAVIOUR_TEMPLATE = """Criterion: {criterion}

How strongly does the text below meet this criterion? 1 means not at all, 10 means fully and \
unmistakably. Rate only the criterion: ignore grammar and fluency, and ignore that the text may \
stop in the middle of a sentence.

The text continues the prompt "{prompt}":
<text>
{text}
</text>

Answer with only {{"score": N}}, N a whole number from 1 to 10."""
COHERENCE_TEMPLATE = """Criterion: {criterion}

How coherent is the text below? 1 means gibberish or the same words over and over, 10 means \
fluent, sensible text that a careful writer could have written. Rate only coherence: ignore the \
topic, and ignore that the text stops in the middle of a sentence (it was cut at a fixed length).

The text continues the prompt "{prompt}":
<text>
{text}
</text>

Answer with only {{"score": N}}, N a whole number from 1 to 10."""
COHERENCE_CRITERION = (
    "The text is fluent and grammatical, follows one line of thought, and neither repeats "
    "itself nor falls into nonsense."
)
