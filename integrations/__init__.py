"""Integrations of the QPO runtime with LLM frameworks.

* :mod:`qpo_middleware.integrations.langchain`: ``QPORewriter``, ``with_qpo`` and
  ``QPOChatModel`` (needs the ``langchain`` extra; stays torch-free).
* :mod:`qpo_middleware.integrations.local`: a LangChain chat model over the
  embedded SmolLM2 for examples and tests (needs the ``train`` and ``langchain`` extras).

Nothing is imported here, so ``import qpo_middleware.integrations`` is free.
"""
