"""python -m rela.eval: see rela/eval/standalone.py."""
import sys

from rela.eval.standalone import main

sys.exit(main())
