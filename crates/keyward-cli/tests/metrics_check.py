"""Scrape a Keyward metrics endpoint and parse it with the Prometheus project's own
OpenMetrics parser (prometheus_client, from PyPI): an independent check of the format.

usage: metrics_check.py LIBDIR URL [TOKEN]
prints {"families": {name: {"type": ..., "samples": [[name, labels, value], ...]}}, "text": ...}
"""
import json
import sys
import urllib.request

sys.path.insert(0, sys.argv[1])
from prometheus_client.openmetrics.parser import text_string_to_metric_families  # noqa: E402

url = sys.argv[2]
req = urllib.request.Request(url)
if len(sys.argv) > 3:
    req.add_header("Authorization", "Bearer " + sys.argv[3])
with urllib.request.urlopen(req, timeout=10) as resp:
    ctype = resp.headers.get("Content-Type", "")
    text = resp.read().decode()

families = {}
for fam in text_string_to_metric_families(text):
    families[fam.name] = {
        "type": fam.type,
        "samples": [[s.name, s.labels, s.value] for s in fam.samples],
    }
print(json.dumps({"content_type": ctype, "families": families, "text": text}))
