"""Getting bytes in: object storage and local files, the one decoder, the isolated decode pool, labelled sources
and scoring inputs, pseudonyms.
"""
