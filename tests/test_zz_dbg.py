import sys, signal
sys.path.insert(0, "/work/main/tests")
from test_run import *  # noqa
from test_run import connected, request, write_stub_cli, LAST_WORDS_ON_SIGTERM

async def test_dbg(tmp_path, environ, stub_bin):
    write_stub_cli(stub_bin, "codex", "import sys\nfor _ in range(300):\n    sys.stdout.write('x' * 100_000 + '\\n')")
    with trio.fail_after(30):
        async with connected(tmp_path, environ) as (_, worker, connection):
            connection.pause_reading()
            await connection.send(request("big", cli="codex"))
            t0 = trio.current_time()
            while "big" not in worker.stages or worker.stages["big"].output.bytes_out < 2**20:
                await trio.sleep(0.01)
                if trio.current_time() - t0 > 5:
                    st = worker.stages.get("big")
                    print("STUCK", st and st.output.bytes_out, st and st.root, st and st.output.seq, len(worker.connection.outbox._frames) if worker.connection else None)
                    raise AssertionError("stuck")
