"""Typed params.yaml: one module per section, each field documented where it is declared.

Deliberately empty: a stage imports only the section modules it reads, so its DVC dependencies stay
exactly those files (`tasks/ops/dag.py` checks this). `params.py` assembles the whole file; the stage harness
imports it only to check the file whole, an import the dag generator leaves out of the deps.
"""
