"""The orchestrator's modules import `triton_python_backend_utils`, which only the Python-backend stub
provides: here they get the stand-in."""

import sys

from tests.orchestration import pb_utils_stand_in

sys.modules.setdefault("triton_python_backend_utils", pb_utils_stand_in)
