# A plan never interrupts running jobs (`--interrupt-jobs`).
package nimbus

import rego.v1

deny contains msg if {
	input.summary.jobs_interrupted > 0
	msg := sprintf("the plan interrupts %d running job(s); drain instead", [input.summary.jobs_interrupted])
}
