"""The V2 REST endpoint with the standard library only.

python examples/v2_rest.py [base URL, default http://127.0.0.1:8000]
"""

from __future__ import annotations

import json
import struct
import sys
import urllib.request
from typing import Any

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
url = f"{base}/v2/models/roundtrip/infer"


def post(body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=30) as answer:
        decoded: dict[str, Any] = json.loads(answer.read())
        return decoded


seed = {"name": "seed", "datatype": "INT64", "shape": [1], "data": [0]}
features = {"name": "features", "datatype": "INT64", "shape": [1], "data": [4]}
as_json = {"name": "x", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]}
answer = post(json.dumps({"inputs": [seed, as_json, features]}).encode(), {})
print("JSON:", answer["outputs"][0]["data"])

raw = struct.pack("<3f", 1.0, 2.0, 3.0)  # x as binary tensor data, after the JSON
as_binary = {
    "name": "x",
    "datatype": "FP32",
    "shape": [3],
    "parameters": {"binary_data_size": len(raw)},
}
head = json.dumps({"inputs": [seed, as_binary, features]}).encode()
binary = post(head + raw, {"Inference-Header-Content-Length": str(len(head))})
print("binary x:", binary["outputs"][0]["data"])
assert (
    answer["outputs"][0]["data"]
    == binary["outputs"][0]["data"]
    == [
        -4.221933364868164,
        -4.221933364868164,
        0.0,
    ]
)
