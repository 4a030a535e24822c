"""Writes the fuzz corpus's seeds: a few frames of valid requests and feedback, so the
fuzzer starts from inputs that reach the engine. Run: python3 tests/fuzz/seeds.py"""
import os, struct

def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])

def field(num, wire, payload):
    key = varint((num << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    return key + varint(len(payload)) + payload

def s(num, text):
    return field(num, 2, text.encode())

def transaction(i, account, merchant, amount, secs, device="", ip="", country="", mcc=""):
    t = s(1, f"tx-{i}") + s(2, account) + s(3, merchant) + field(4, 0, amount) + s(5, "EUR")
    t += field(6, 2, field(1, 0, secs)) + field(7, 0, 2)
    for num, v in ((8, mcc), (9, country), (10, device), (11, ip)):
        if v:
            t += s(num, v)
    return field(1, 2, t) + field(2, 0, 1)

def feedback(i, label):
    return s(1, f"tx-{i}") + field(2, 0, label) + field(3, 0, 1)

def frame(kind, msg):
    return bytes([kind]) + struct.pack("<H", len(msg)) + msg

corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "requests")
os.makedirs(corpus, exist_ok=True)
seeds = {
    "one_score": frame(0, transaction(1, "a1", "m1", 1299, 1740787200)),
    "score_then_feedback": frame(0, transaction(2, "a1", "m2", 99999, 1740787260, "d1", "10.0.0.1", "DE", "5411"))
    + frame(2, feedback(2, 1)),
    "burst": b"".join(frame(0, transaction(10 + k, "a2", f"m{k % 3}", 500 + k, 1740787200 + 30 * k)) for k in range(8))
    + frame(2, feedback(12, 1)) + frame(2, feedback(12, 2)),
}
for name, data in seeds.items():
    with open(os.path.join(corpus, name), "wb") as f:
        f.write(data)
