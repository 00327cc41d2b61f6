"""entcal decoders inside vLLM.

:mod:`~entcal.decoding.vllm.request` (a request's spec, admission checks, its decoder instance)
is imported by the runner adapters :mod:`~entcal.decoding.vllm.v1` and
:mod:`~entcal.decoding.vllm.v2`; :mod:`~entcal.decoding.vllm.processor` holds the class users
register, which builds the adapter of whichever runner asks; :mod:`~entcal.decoding.vllm.plugin`
is the ``vllm.logits_processors`` entry point; :mod:`~entcal.decoding.vllm.engine` drives an offline
``vllm.LLM`` with the processor (compare's and train's vLLM engine). Nothing here imports vLLM at
package import.
"""
