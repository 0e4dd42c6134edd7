"""The constrained decoder: regex and JSON schema compiled to token-level automata.

Pipeline: a regex (`fsm.regex`) or JSON schema (`fsm.json_schema`) becomes a term of the
byte-level algebra in `fsm.terms`; its derivatives give a lazily built DFA (`fsm.dfa`);
`TokenGuide` (`fsm.guide`) turns DFA states into cached token masks with the native trie
walk (`fsm.token_trie`), and reports forced text for jump-forward.
"""

from fsm.compiler import GuideCompiler, compile_json_schema, compile_regex
from fsm.dfa import DEAD
from fsm.errors import ConstraintError
from fsm.guide import TokenGuide
from fsm.json_schema import canonical_dumps
from fsm.vocabulary import Vocabulary

__all__ = [
    "DEAD",
    "ConstraintError",
    "GuideCompiler",
    "TokenGuide",
    "Vocabulary",
    "canonical_dumps",
    "compile_json_schema",
    "compile_regex",
]
