"""`sealft evaluate`: safety, over-refusal, task and helpfulness evaluation of a model/adapter.

Modules: `generate` (batched, resumable generation), `suites` (prompt sets and their data files),
`judges` (keyword / classifier / LLM judges), `llm_client` (OpenAI-compatible HTTP), `metrics`
(pure arithmetic), `run` (the `evaluate` entry point and its output contract).
"""

from sealft.evaluate.run import EvaluateArgs, evaluate

__all__ = ["EvaluateArgs", "evaluate"]
