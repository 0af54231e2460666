"""Deploy: run scheduling policies against live vLLM engines (gateway, engines, replay, calibration)."""
