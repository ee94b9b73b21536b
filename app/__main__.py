import sys

if __name__ == "__main__":  # not when a spawned worker process imports it
    from training.interrupts import stop_status, stops_held

    with stops_held() as stops:  # Ctrl-C while PyTorch loads: a quiet exit, not a traceback
        from app.cli import main
    sys.exit(stop_status(stops[0]) if stops else main())
