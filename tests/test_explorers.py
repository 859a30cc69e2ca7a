"""Interactive explorers: a static figure always; widgets only in a live kernel, never on the site.

Run also under ipywidgets 7.7.1 (Colab's) by putting it first on PYTHONPATH; the code uses only the
API both 7.7.1 and 8.x share.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("ipywidgets")


@pytest.fixture()
def tiny_model_and_pages():
    from effdl.tokens import TinyViT, make_documents

    torch.manual_seed(0)
    x, _ = make_documents(3, seed=0)
    return TinyViT(depth=2, dim=32, heads=2).eval(), x


def _make(name, keep):
    from effdl.tokens import reducers

    return reducers.make(name, keep=keep)


def test_kept_tokens_explorer_draws_static_figure_and_widgets(tiny_model_and_pages, monkeypatch, capsys):
    from effdl.tokens.plots import explore_kept

    monkeypatch.delenv("EFFDL_SITE_BUILD", raising=False)
    model, x = tiny_model_and_pages
    fig = explore_kept(model, x, _make, ["evit", "tcc"])
    assert fig is not None and len(fig.axes) >= 2


def test_no_widget_on_the_site(tiny_model_and_pages, monkeypatch):
    import ipywidgets

    from effdl.tokens.plots import explore_kept

    monkeypatch.setenv("EFFDL_SITE_BUILD", "1")
    created = []
    monkeypatch.setattr(ipywidgets.Widget, "__init__",
                        lambda self, *a, **k: created.append(type(self).__name__) or None)
    model, x = tiny_model_and_pages
    fig = explore_kept(model, x, _make, ["evit"])
    assert fig is not None and created == []


@pytest.mark.parametrize("controls", [dict(method=["a", "b"]), dict(keep=(0.6, 0.9)), dict(page=(0, 3))])
def test_explorer_rejects_a_default_its_control_cannot_show(controls):
    """A default outside its dropdown or slider would only fail later, in a live kernel."""
    from effdl.plot import explorer

    def draw(method="c", keep=0.5, page=1.5):
        return None

    with pytest.raises(TypeError, match="default"):
        explorer(draw, [], **controls)
