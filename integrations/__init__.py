"""Integrations of the QPO runtime with LLM frameworks.

* :mod:`qpo_middleware.integrations.langchain`: ``QPORewriter``, ``with_qpo`` and
  ``QPOChatModel`` (needs the ``langchain`` extra; stays torch-free).

The local SmolLM2 chat model for examples and tests lives on the training side, as
:func:`qpo_middleware.training.chat.local_smollm2_chat` (needs the ``train`` extra).

Nothing is imported here, so ``import qpo_middleware.integrations`` is free.
"""
