"""The math-verify worker process: one JSON request per line in, one reply per line out.

Runs on its own main thread with math-verify's signal-based timeouts disabled; the
parent enforces the time limit by killing this process.
"""
import json
import sys


def main() -> None:
    from math_verify import parse, verify

    for line in sys.stdin:
        req = json.loads(line)
        try:
            gold = parse(f"${req['gold']}$", parsing_timeout=None)
            if not gold:
                gold = parse(req["gold"], parsing_timeout=None)
            pred = parse(req["pred"], parsing_timeout=None)
            ok = bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=None)
            reply = {"id": req["id"], "score": 1.0 if ok else 0.0}
        except Exception as exc:  # noqa: BLE001 - any parser failure scores 0 in the parent
            reply = {"id": req["id"], "error": f"{type(exc).__name__}: {exc}"[:200]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
