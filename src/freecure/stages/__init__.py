"""The stages of a FreeCure run (paper Figure 5): SAME pass, masks (eq. 4–5), a correction (ROFA or FASA),
expression restore, with their records. The pipeline chains them."""
