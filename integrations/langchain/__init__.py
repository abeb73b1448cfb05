"""LangChain integration: rewrite every query with the QPO policy before the chat model sees it.

Three entry points:

* :class:`QPORewriter` (:mod:`.rewriter`): a Runnable that takes what a chat model takes (a
  string, a ``PromptValue``, a list of messages) or a dict holding one of those under
  ``input_key``, and returns the same kind with the policy's prompt added around the last
  human turn. The query text itself is never altered or dropped.
* :func:`with_qpo` (:mod:`.rewriter`): ``QPORewriter(...) | chat_model`` in one call.
* :class:`QPOChatModel` (:mod:`.chat_models`): a ``BaseChatModel`` that rewrites, then
  delegates to any chat model (streaming, tools and structured output pass through).

Tracing: every rewrite is a run (run type ``prompt``) that starts once the policy has
answered. Its metadata holds ``qpo_bundle_id``, ``qpo_prompt``, ``qpo_status`` (the runtime's
:class:`~qpo_middleware.Status`: ``rewritten``, ``cached``, ``skipped``, ``timeout`` or
``overloaded``; or ``error`` when the policy raised), ``qpo_latency_ms`` and ``qpo_tokens``
(``qpo_error`` instead when the call raised). Every callback handler sees them at the run's
start and again as the custom event ``qpo_rewrite`` (:data:`QPO_EVENT`).

Budget and fail-open: ``latency_budget_ms`` and ``fail_open`` go with every optimizer call,
and the runtime enforces them (it is the one owner of the budget): past the budget a query
goes on unchanged (``qpo_status`` ``timeout``), or with ``fail_open=False``
:class:`LatencyBudgetExceeded` (the runtime's) is raised, whether the decode loop or the wait
for a micro-batch noticed it. A policy error likewise passes the input on unchanged (logged,
counted in :attr:`QPORewriter.stats`) or, with ``fail_open=False``, is raised.

This package imports neither torch nor transformers.
"""

from .chat_models import QPOChatModel
from .rewriter import QPO_EVENT, LatencyBudgetExceeded, QPORewriter, bundle_id, with_qpo

__all__ = ["QPO_EVENT", "LatencyBudgetExceeded", "QPOChatModel", "QPORewriter", "bundle_id", "with_qpo"]
