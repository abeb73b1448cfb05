"""An LCEL chain: ChatPromptTemplate | QPORewriter | chat model | StrOutputParser.

The rewriter adds the policy's prompt to the human turn the template produced;
the template's system message and the review text are kept as they are. A
callback handler prints the prompt the policy wrote for each review (it is also
in the QPORewriter run's metadata for tracers such as LangSmith).

    python examples/lcel_chain.py --bundle runs/quickstart/bundle
"""

from __future__ import annotations

from typing import Any

from _chat import REVIEWS, make_chat, parser
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from qpo_middleware.integrations.langchain import QPO_EVENT, QPORewriter


class ShowPrompt(BaseCallbackHandler):
    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == QPO_EVENT:
            print(
                f"  policy prompt ({data['qpo_status']}, {data.get('qpo_latency_ms', 0):.0f} ms): {data['qpo_prompt']!r}"
            )


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    template = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a film critic. Answer with one word: positive or negative."),
            ("human", "{review}"),
        ]
    )
    chain = (
        template
        | QPORewriter(bundle=args.bundle)
        | make_chat(args.chat, args.max_new_tokens)
        | StrOutputParser()
    )
    for review in REVIEWS[:4]:
        print(f"review: {review}")
        answer = chain.invoke({"review": review}, {"callbacks": [ShowPrompt()]})
        print(f"  answer: {answer.strip()!r}")


if __name__ == "__main__":
    main()
