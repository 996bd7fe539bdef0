"""The documented Python API (docs/python-api.md): its code block, run as written on a trained export."""

import re

import pytest

from tests.support import ROOT


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_the_documented_notebook_block_runs_on_a_trained_export(tiny_trained, capsys):
    cfg, out, _ = tiny_trained
    block = re.search(r"```python\n(.*?)```", (ROOT / "docs/python-api.md").read_text(), re.S).group(1)
    assert 'bundlerec.load("runs/demo/export", user_key_file="runs/demo/user_key")' in block
    code = block.replace('"runs/demo/export"', repr(out["export_dir"])).replace('"runs/demo/user_key"', repr(cfg.serve.user_key_file))
    scope: dict = {}
    exec(compile(code, "docs/python-api.md", "exec"), scope)
    top, live, bundles, cart = scope["top"], scope["live"], scope["bundles"], scope["cart"]
    assert len(top["items"]) == 5 and top["history_source"] == "user" and not top["cold_start"]
    assert live["history_source"] != "cold_start" and len(live["items"]) == 5
    assert bundles and all(2 <= len(b["items"]) <= 3 for b in bundles)
    assert cart["items"] and items_not_in_cart(cart, scope["items"][:1])
    assert isinstance(scope["by_text"], list)
    # the same object a replica serves: the export's loader refuses a pseudonymized export without its key
    import bundlerec

    with pytest.raises(RuntimeError, match="pseudonymized"):
        bundlerec.load(out["export_dir"])


def items_not_in_cart(answer: dict, cart: list) -> bool:
    return not {i["item_id"] for i in answer["items"]} & set(cart)
