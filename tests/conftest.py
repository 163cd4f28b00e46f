import sys
from pathlib import Path

# tests/openai_schema.py is a helper shared by unit and integration tests.
sys.path.insert(0, str(Path(__file__).parent))
