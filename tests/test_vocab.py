from oncoscope.vocab import percent


def test_probabilities_never_read_as_certain():
    assert [percent(p) for p in (1.0, 0.99951, 0.999, 0.5, 0.0012, 0.0004, 0.0, None)] == \
        [">99.9%", ">99.9%", "99.9%", "50.0%", "0.1%", "<0.1%", "<0.1%", "–"]


def test_the_page_filter_is_the_same_function_the_pdf_uses(tmp_path):
    from oncoscope.config import Settings
    from oncoscope.web import create_app

    app = create_app({"TESTING": True}, settings=Settings.from_env(home=tmp_path), start_workers=False)
    assert app.jinja_env.filters["pct"] is percent
    app.extensions["oncoscope"]["engine"].dispose()
