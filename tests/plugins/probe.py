"""A command for tests/test_fork_server.py: says whether it runs in a fork-server worker (torch already
imported before its own code ran) and its process ids; `sleep S` then waits, `exit N` exits with N."""

import os
import sys
import time

print(f"torch_preloaded={'torch' in sys.modules} pid={os.getpid()} cwd={os.getcwd()} argv={sys.argv[1:]}", flush=True)
print(f"env={os.environ.get('PROBE_VALUE')}", flush=True)
if sys.argv[1:2] == ["sleep"]:
    time.sleep(float(sys.argv[2]))
if sys.argv[1:2] == ["exit"]:
    sys.exit(int(sys.argv[2]))
