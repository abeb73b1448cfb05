"""with_qpo in three lines: any chat model, with a prompt written for each query.

python examples/with_qpo_three_lines.py --bundle runs/quickstart/bundle
"""

from __future__ import annotations

from _chat import make_chat, parser

from qpo_middleware.integrations.langchain import with_qpo

if __name__ == "__main__":
    args = parser(__doc__.splitlines()[0], max_new_tokens=32).parse_args()
    chat_model = make_chat(args.chat, args.max_new_tokens)

    # --- the three lines --------------------------------------------------------------
    chain = with_qpo(chat_model, args.bundle)
    reply = chain.invoke("Is this review positive or negative? 'a gorgeous, witty, seductive movie.'")
    print(reply.content)
