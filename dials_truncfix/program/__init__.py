"""dials.correct_truncation behind its command line: planning the outputs
(:mod:`.planning`), correcting and writing the images (:mod:`.tasks`), the
corrected experiment lists (:mod:`.experiments`) and the HTML report
(:mod:`.report`)."""
