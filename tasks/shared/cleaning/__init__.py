"""The clean stage's engine: normalize, scrub PII, filter and deduplicate one raw parquet file.

`files.clean_file` / `files.clean_to` clean one file: the corpus streamed in bounded batches (`corpus`), the
labeled set held in memory (`labeled`: conflicting labels need a global view). Every filter counts what it
removed or changed, keeps up to three examples (taken after PII scrubbing, so no PII reaches a report) and
explains itself in the Markdown report (`report`).

    pii       e-mail, IP, phone and secret scrubbing, anchored searches over a whole batch
    quality   letter share, repeated lines and characters (numpy lookup tables for non-ASCII text)
    filters   TextCleaner: the per-text steps (normalize, length, PII, quality) over a batch
    dedup     exact digests in a compact hash index; MinHash-LSH near-duplicates (rensa)
    workers   the per-text work of the corpus pass, in this process or a pool of workers
    corpus    the streamed corpus pass: batches in order, dedup, writing
    labeled   the labeled pass: labels normalized, conflicts and split-aware duplicates removed
    inputs    opening a raw file, row ids
    report    DatasetReport, the reasons of each filter, the Markdown report
    files     clean_to / clean_file: one file of either kind

Speed: the per-text steps run over a batch at a time (the PII anchors searched once over the batch's texts
joined, letters and repeated characters counted with numpy lookup tables); with `workers`, pool processes
do them (and the digests and MinHash signatures) on ~1 MB parts while the main process reads, deduplicates
and writes, batch by batch in order, so the output is the same byte for byte whatever the number of workers.
"""
