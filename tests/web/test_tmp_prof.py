import io, time, cProfile, pstats
from PIL import Image
from oncoscope.ml.synthetic import smear_field
from .conftest import PATIENT_A_ID, pool_for
from .test_flows import MULTIPART, case_id_of
def png(a):
    b = io.BytesIO(); Image.fromarray(a).save(b, "PNG"); return b.getvalue()
def test_prof(app, client_for):
    c = client_for("doc_a")
    imgs = []
    for k in range(16):
        cells = [(110 + 160 * (i % 8), 110 + 170 * (i // 8), 11.0 + (i % 3)) for i in range(32)]
        imgs.append((io.BytesIO(png(smear_field(40 + k, 0.2, (1330, 780), cells)[0])), f"f{k}.png"))
    cid = case_id_of(c.post(f"/patients/{PATIENT_A_ID}/cases/new", data={"analyzer_id": "smear-differential", "clinical_note": "", "images": imgs}, content_type=MULTIPART))
    while pool_for(app).run_one():
        pass
    c.get(f"/cases/{cid}/cells")
    for _ in range(2):
        t = time.perf_counter(); r = c.get(f"/cases/{cid}/cells"); print("GET cells", round((time.perf_counter() - t) * 1e3), "ms", len(r.data))
    pr = cProfile.Profile(); pr.enable(); c.get(f"/cases/{cid}/cells"); pr.disable()
    pstats.Stats(pr).sort_stats("cumtime").print_stats(25)
    import re
    ids = [int(i) for i in re.findall(r'data-id="(\d+)"', r.data.decode())]
    ts = []
    for i in ids[:40]:
        t = time.perf_counter(); c.post(f"/cases/{cid}/cells", json={"changes": [{"id": i, "class": "lymphocyte"}]}); ts.append((time.perf_counter() - t) * 1e3)
    ts.sort(); print("PATCH p50", round(ts[20]), "p95", round(ts[37]))
    t = time.perf_counter(); r = c.get(f"/cases/{cid}/images/1/gallery.jpg"); print("sprite", round((time.perf_counter() - t) * 1e3), len(r.data))
