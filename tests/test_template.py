from __future__ import annotations

import pytest

from qpo_middleware.template import Demo, Template, TemplateError


@pytest.mark.parametrize("placement", ["before", "after", "system"])
def test_query_is_verbatim_in_every_placement(placement: str) -> None:
    query = "  spaces {braces} and\nnewlines \u202e RTL 🎬  "
    rendered = Template(placement=placement).render("Classify it.", query)
    assert query in rendered.text
    assert rendered.messages[-1] == {"role": "user", "content": rendered.text}


def test_layouts() -> None:
    assert Template("before").render("P", "Q").text == "P\n\nQ"
    assert Template("after", separator=" ").render("P", "Q").text == "Q P"
    system = Template("system").render("P", "Q")
    assert system.messages == [{"role": "system", "content": "P"}, {"role": "user", "content": "Q"}]
    # No prompt: the query alone, no dangling separator, no empty system turn.
    for placement in ("before", "after", "system"):
        assert Template(placement).render("", "Q").messages == [{"role": "user", "content": "Q"}]


def test_demonstrations_come_before_the_query() -> None:
    text = Template().render("P", "Q", [Demo("q1", "a1"), Demo("q2", "a2")]).text
    assert text == "P\n\nq1\nAnswer: a1\n\nq2\nAnswer: a2\n\nQ"


def test_round_trip_and_errors() -> None:
    template = Template(placement="after", separator=" -- ")
    assert Template.from_dict(template.to_dict()) == template
    with pytest.raises(TemplateError, match="placement"):
        Template(placement="middle")  # type: ignore[arg-type]
    with pytest.raises(TemplateError, match="Unknown template field"):
        Template.from_dict({"placement": "before", "exec": "rm -rf"})
    with pytest.raises(TemplateError, match="demo_format"):
        Template(demo_format="{query} {secret}")
